//! `netd-cni`: netd as a CNI plugin (see `netd::engines::cni`).
fn main() {
    // The iptables datapath's userland proxies that netd-cni starts run its own executable.
    if std::env::args_os().nth(1).is_some_and(|a| a == "proxy") {
        std::process::exit(netd::cli::proxy::standalone());
    }
    std::process::exit(netd::engines::cni::main());
}
