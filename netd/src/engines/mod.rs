//! netd under other container engines: a CNI plugin (`netd-cni`) and Docker's network and
//! IPAM driver. Both reach the controller only through [`core`].
pub mod cni;
pub mod core;
pub mod docker;
