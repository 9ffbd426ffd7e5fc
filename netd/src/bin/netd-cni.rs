//! `netd-cni`: netd as a CNI plugin (see `netd::engines::cni`).
fn main() {
    std::process::exit(netd::engines::cni::main());
}
