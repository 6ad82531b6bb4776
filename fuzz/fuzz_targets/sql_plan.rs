//! Fuzzes the SQL-to-plan path: any UTF-8 text, planned against the
//! synthetic CTDC schema with the node's default limits, must give a plan
//! or an error with a message, never a panic, an abort or a stack
//! overflow.
//!
//! The node plans on a tokio blocking thread (2 MiB of stack), so this
//! target plans on a thread of that size too: a recursion that only fits
//! the main thread's 8 MiB still counts as a crash.

#![no_main]

use std::sync::OnceLock;

use fedq_node::config::Limits;
use fedq_plan::plan::{cell_count, cell_keys, dataset_of, plan};
use fedq_plan::schema::Schema;
use libfuzzer_sys::fuzz_target;

/// Stack of a tokio blocking thread, where the node plans queries.
const NODE_STACK: usize = 2 << 20;

fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::from_specs("cases", &fedq_node::synth::ctdc_columns())
            .expect("the CTDC schema is valid")
    })
}

fn check(sql: &str) {
    let limits = Limits::default();
    // The node refuses longer SQL before parsing it.
    if sql.len() > limits.max_sql_bytes {
        return;
    }
    if let Err(e) = dataset_of(sql) {
        assert!(!e.0.is_empty(), "empty error");
    }
    match plan(sql, schema(), limits.max_cells) {
        Ok(p) => {
            assert!(!p.outputs.is_empty() && !p.measurements.is_empty());
            assert!(p.cell_count() <= limits.max_cells);
            assert_eq!(cell_keys(&p, schema()).len(), cell_count(&p));
            for m in &p.measurements {
                assert!(m.sensitivity() >= 1);
            }
        }
        Err(e) => assert!(!e.0.is_empty(), "empty error"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let sql = sql.to_string();
    std::thread::Builder::new()
        .stack_size(NODE_STACK)
        .spawn(move || check(&sql))
        .expect("spawn a planning thread")
        .join()
        .expect("planning panicked");
});
