//! One module per attach point.

mod bridge;
mod endpoint;
mod host_sock;
mod uplink;
mod uplink_xdp;
