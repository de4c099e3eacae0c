//! Keeps docs/schemas/ in step with the types.
//!
//! `cargo test -p ebb-sdk --features schema` fails when a committed schema differs from the one the types
//! generate; `EBB_UPDATE_SCHEMAS=1` with the same command rewrites the files instead.

use std::path::PathBuf;

use ebb_sdk::*;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema};

/// Requests are read by the agent, so their schema describes what it accepts.
fn input<T: JsonSchema>() -> Schema {
    SchemaSettings::default()
        .into_generator()
        .into_root_schema_for::<T>()
}

/// Replies, results and events are written by the agent, so their schema describes what it sends
/// (for example `request_id` is always present, `error` only on failure).
fn output<T: JsonSchema>() -> Schema {
    SchemaSettings::default()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<T>()
}

fn schemas() -> Vec<(&'static str, Schema)> {
    vec![
        ("status_request", input::<StatusRequest>()),
        ("reload_request", input::<ReloadRequest>()),
        ("drain_request", input::<DrainRequest>()),
        ("undrain_request", input::<UndrainRequest>()),
        ("stop_request", input::<StopRequest>()),
        ("push_request", input::<PushRequest>()),
        ("reply", output::<Reply>()),
        ("status_result", output::<StatusResult>()),
        ("reload_result", output::<ReloadResult>()),
        ("drain_result", output::<DrainResult>()),
        ("undrain_result", output::<UndrainResult>()),
        ("stop_result", output::<StopResult>()),
        ("event", output::<Event>()),
        ("node_record", output::<NodeRecord>()),
    ]
}

#[test]
fn schemas_are_up_to_date() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas");
    let update = std::env::var_os("EBB_UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (name, schema) in schemas() {
        let path = dir.join(format!("{name}.schema.json"));
        let generated = serde_json::to_string_pretty(&schema).expect("a schema is JSON") + "\n";
        if update {
            std::fs::create_dir_all(&dir).expect("create docs/schemas");
            std::fs::write(&path, &generated).expect("write schema");
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(generated.as_str()) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "schemas out of date, run `EBB_UPDATE_SCHEMAS=1 cargo test -p ebb-sdk --features schema \
         --test schemas`: {stale:?}"
    );
}
