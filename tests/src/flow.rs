//! A bulk TCP flow from the outside namespace to a published port that runs until the test
//! stops it: however long the steps made under it take on a busy machine, they happen while
//! it runs (a fixed-length flow once ended before the last of them did).

use std::{
    io::Read as _,
    net::IpAddr,
    process::{Child, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cli::{eventually, published_tcp_bytes},
    harness::TestEnv,
};

/// An iperf3 client reporting every half second; killed if the test fails before stopping it.
pub struct Flow {
    client: Child,
}

impl Flow {
    /// Starts the client towards `addr:port`, where an iperf3 server listens behind the port.
    pub fn start(env: &TestEnv, addr: IpAddr, port: u16) -> Self {
        let client = env
            .cmd_in(
                &env.outside_ns(),
                "iperf3",
                &[
                    "-c",
                    &addr.to_string(),
                    "-p",
                    &port.to_string(),
                    "-t",
                    "600",
                    "-i",
                    "0.5",
                    "-J",
                ],
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Self { client }
    }

    /// Asserts the datapath's published flows carry another MiB within `within`.
    pub fn assert_moving(&self, env: &TestEnv, within: Duration, after: &str) {
        let before = published_tcp_bytes(env);
        assert!(
            eventually(within, || published_tcp_bytes(env) > before + (1 << 20)),
            "the flow stalled {after}"
        );
    }

    /// Stops the client as Ctrl-C would, so it still prints its report, and asserts every
    /// whole half second of the flow carried data.
    pub fn stop_and_assert_never_stalled(mut self) {
        let pid = Pid::from_raw(self.client.id() as i32);
        kill(pid, Signal::SIGINT).unwrap();
        let mut stdout = Vec::new();
        self.client
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut stdout)
            .unwrap();
        // The exit status is 1 after an interrupt; the report says why the client ended.
        self.client.wait().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&stdout).expect("iperf3 JSON");
        assert_eq!(
            report["error"], "interrupt - the client has terminated",
            "the flow ended before it was stopped"
        );
        // The last interval is the part cut short by the interrupt.
        let intervals = report["intervals"].as_array().unwrap();
        let (_, whole) = intervals.split_last().expect("no intervals");
        for (i, interval) in whole.iter().enumerate() {
            let bytes = interval["sum"]["bytes"].as_u64().unwrap();
            assert!(bytes > 0, "interval {i} carried nothing: the flow stalled");
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        // After a stop the client is reaped, and std signals nothing.
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}
