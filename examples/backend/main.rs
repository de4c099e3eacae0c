//! `ebb-demo-backend --listen 127.0.0.1:8081`: the quickstart's backend. See the library docs for
//! what it answers.

use std::net::SocketAddr;
use std::process::ExitCode;

const USAGE: &str = "usage: ebb-demo-backend [--listen ADDR]   (default 127.0.0.1:8081)";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<SocketAddr>, String> {
    let mut listen: SocketAddr = "127.0.0.1:8081".parse().expect("valid default address");
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => args.next().ok_or("--listen needs an address")?,
            other => match other.strip_prefix("--listen=") {
                Some(value) => value.to_owned(),
                None => return Err(format!("unexpected argument {other:?}")),
            },
        };
        listen = value
            .parse()
            .map_err(|e| format!("invalid address {value:?}: {e}"))?;
    }
    Ok(Some(listen))
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match parse_args(std::env::args().skip(1)) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ebb-demo-backend: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("ebb-demo-backend: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "ebb-demo-backend: listening on {}",
        listener.local_addr().unwrap_or(addr)
    );
    ebb_examples::serve(listener).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::parse_args;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_listen() {
        assert_eq!(
            parse_args(args(&[])).unwrap().unwrap().to_string(),
            "127.0.0.1:8081"
        );
        let parsed = parse_args(args(&["--listen", "0.0.0.0:9000"]))
            .unwrap()
            .unwrap();
        assert_eq!(parsed.to_string(), "0.0.0.0:9000");
        let parsed = parse_args(args(&["--listen=[::1]:80"])).unwrap().unwrap();
        assert_eq!(parsed.to_string(), "[::1]:80");
        assert_eq!(parse_args(args(&["--help"])).unwrap(), None);
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--listen", "nope"])).is_err());
        assert!(parse_args(args(&["--bogus"])).is_err());
    }
}
