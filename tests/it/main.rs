//! Integration tests: the gateway in-process (or as the real binary) on 127.0.0.1, with the IAM
//! simulator and the demo upstream from `mfa_gate::dev` as its peers. Nothing leaves loopback.

mod support;

mod alibaba;
mod beyond;
mod cli;
mod dashboards;
mod enforce;
mod faults;
mod fleet;
mod forwarding;
mod fuzz_regressions;
mod head_deadline;
mod hostile;
mod incident;
mod own_h1;
mod properties;
mod reload;
mod tls;
mod upstream_wire;
