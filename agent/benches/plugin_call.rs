//! The cost of one idle check through the plugin ABI (docs/BENCHMARKS.md, "Plugin call overhead").
//!
//! - `abi_call`: one `check_idle` call through the C table on the calling thread: the context as JSON
//!   in, the SDK's parse and panic guard, the plugin's answer as JSON out, the host's parse, and the
//!   string handed back to the plugin's `free_string`. The plugin itself does nothing (always idle).
//! - `host_check_idle`: `PluginHost::check_idle` as the agent calls it: the same call, plus encoding the
//!   context, the hop to the plugin's thread and back over channels, and the timeout.
//!
//! The test plugin (plugins/test-plugin) is a dev-dependency, so cargo builds its cdylib into
//! target/<profile>/deps next to this benchmark.

use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ebb_agent::config::{Dur, OnError, PluginConfig};
use ebb_agent::plugins::library::{self, Instance};
use ebb_agent::plugins::{open_checked, CheckContext, PluginHost, Verdict};

fn test_plugin() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable");
    let deps = exe.parent().expect("deps dir");
    let so = deps.join("libebb_plugin_test.so");
    assert!(
        so.exists(),
        "{} is missing: cargo builds it as a dev-dependency",
        so.display()
    );
    so
}

fn ctx() -> CheckContext {
    CheckContext {
        node: Some("web-1".into()),
        drain_id: Some("d-0123456789".into()),
        started_at_ms: Some(1_700_000_000_000),
        elapsed_ms: Some(12_345),
        timeout_ms: 2000,
    }
}

fn bench(c: &mut Criterion) {
    let so = test_plugin();

    let checked = open_checked(&so, None, false).expect("checks pass");
    let table = library::load(checked).expect("loads");
    let mut instance = Instance::create(&table, "{}").expect("creates");
    let ctx_json = CString::new(serde_json::to_string(&ctx()).unwrap()).unwrap();
    assert_eq!(instance.check_idle(&ctx_json), Ok(Verdict::Idle));
    c.bench_function("abi_call", |b| {
        b.iter(|| instance.check_idle(std::hint::black_box(&ctx_json)))
    });

    let host = PluginHost::load(&[PluginConfig {
        name: "bench".into(),
        path: so.clone(),
        sha256: None,
        timeout: Dur(Duration::from_secs(2)),
        on_error: OnError::Busy,
        config: serde_json::json!({}),
    }])
    .expect("host loads");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = ctx();
    assert_eq!(runtime.block_on(host.check_idle(&ctx))[0].1, Verdict::Idle);
    c.bench_function("host_check_idle", |b| {
        b.iter(|| runtime.block_on(host.check_idle(std::hint::black_box(&ctx))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
