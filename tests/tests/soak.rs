//! One minute of the soak (`cargo xtask soak` runs it for longer): churn, routing changes and
//! failing backends under steady L4 and L7 load, with the thresholds of `tests::soak`. Needs
//! root.

use std::time::Duration;

#[test]
fn a_one_minute_soak_meets_every_threshold() {
    let report = tests::soak::run(Duration::from_secs(60));
    let table = report.table();
    eprintln!("{table}");
    assert!(report.passed(), "the soak missed a threshold:\n{table}");
}
