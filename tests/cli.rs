//! The `ebb` command line itself, from the real binary: shell completions and how `ebb ctl --help`
//! lays out its options.

mod support;

use std::time::Duration;

use support::*;

/// No run of this suite needs a server; past this it hangs, and the test fails instead.
const LIMIT: Duration = Duration::from_secs(30);

async fn ebb(args: &[&str]) -> CtlRun {
    run_ebb(args, &[], LIMIT).await
}

#[tokio::test]
async fn completions_print_a_script_for_each_shell() {
    for (shell, marker, context_flag) in [
        ("bash", "complete -F _ebb", "--context"),
        ("zsh", "#compdef ebb", "--context"),
        ("fish", "complete -c ebb", "-l context"),
    ] {
        let run = ebb(&["completions", shell]).await;
        assert_eq!(run.code, 0, "ebb completions {shell}: {run:?}");
        assert!(
            run.stdout.contains(marker),
            "ebb completions {shell} has {marker:?}: {}",
            &run.stdout[..run.stdout.len().min(500)]
        );
        // The subcommands, ctl's verbs and its connection flags are completed too.
        for word in ["agent", "ctl", "drain", context_flag] {
            assert!(
                run.stdout.contains(word),
                "ebb completions {shell} completes {word}"
            );
        }
    }
}

#[tokio::test]
async fn completions_for_an_unknown_shell_is_a_usage_error() {
    let run = ebb(&["completions", "tcsh"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stdout.is_empty(), "no script: {run:?}");
    assert!(
        run.stderr.contains("tcsh") && run.stderr.contains("bash"),
        "names the shell it refuses and those it knows: {run:?}"
    );
}

/// The index of the line of `text` that starts (after indentation) with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{text}"))
}

#[tokio::test]
async fn ctl_help_lists_the_connection_flags_apart_after_the_verbs_own() {
    let run = ebb(&["ctl", "drain", "--help"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let help = &run.stdout;
    let heading = line_of(help, "Connection:");
    for own in ["--node", "--drain-id", "--min-period", "--wait", "--yes"] {
        assert!(
            line_of(help, own) < heading,
            "drain's own {own} comes before the Connection section:\n{help}"
        );
    }
    for flag in [
        "--nats",
        "--context",
        "--prefix",
        "--creds",
        "--nkey",
        "--token",
        "--user",
        "--password",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
        "--timeout",
        "--json",
    ] {
        assert!(
            line_of(help, flag) > heading,
            "{flag} is under Connection:\n{help}"
        );
    }

    // The same for a verb with no options besides its target.
    let run = ebb(&["ctl", "status", "--help"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let heading = line_of(&run.stdout, "Connection:");
    assert!(line_of(&run.stdout, "--node") < heading, "{}", run.stdout);
    assert!(line_of(&run.stdout, "--creds") > heading, "{}", run.stdout);
}
