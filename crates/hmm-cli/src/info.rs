//! `hmm info`.

use std::process::ExitCode;

use serde::Serialize;

#[derive(Serialize)]
struct JsonCheck<'a> {
    name: &'a str,
    present: bool,
    required: bool,
    detail: &'a str,
}

#[derive(Serialize)]
struct JsonReport<'a> {
    kernel: &'a str,
    root: bool,
    usable: bool,
    checks: Vec<JsonCheck<'a>>,
    thp_enabled: Option<&'a str>,
    hugetlb_page_size: Option<u64>,
    hugetlb_free: Option<u64>,
}

/// Prints the report; exits non-zero when a required feature is missing.
pub fn run(json: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let r = hmm::info::probe();
    if json {
        let j = JsonReport {
            kernel: &r.kernel,
            root: r.root,
            usable: r.usable(),
            checks: r
                .checks
                .iter()
                .map(|c| JsonCheck {
                    name: &c.name,
                    present: c.present,
                    required: c.required,
                    detail: &c.detail,
                })
                .collect(),
            thp_enabled: r.thp_enabled.as_deref(),
            hugetlb_page_size: r.hugetlb_page_size,
            hugetlb_free: r.hugetlb_free,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
        println!(
            "kernel {}{}",
            r.kernel,
            if r.root { " (running as root)" } else { "" }
        );
        let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &r.checks {
            let state = match (c.present, c.required) {
                (true, _) => "present",
                (false, true) => "MISSING",
                (false, false) => "missing",
            };
            let kind = if c.required { "required" } else { "optional" };
            println!("  {:width$}  {state:8}  {kind:8}  {}", c.name, c.detail);
        }
        println!(
            "{}",
            if r.usable() {
                "usable: every required feature is present"
            } else {
                "NOT usable: a required feature is missing (see above)"
            }
        );
    }
    Ok(if r.usable() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
