//! The iptables datapath installs Docker 20.10's rule set in the sandbox host namespace and
//! removes every rule and chain again. (Traffic through it is tested with the controller.)

use netd::{
    datapath::{self, NetworkSpec, PortSpec, Protocol},
    netns,
};
use tests::harness::TestEnv;

fn iptables_save(env: &TestEnv) -> String {
    let out = env.run_in(&env.host_ns(), "iptables-save", &[]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn iptables_datapath_installs_and_removes_docker_rules() {
    let env = TestEnv::new();
    let net = NetworkSpec {
        id: 1,
        name: "bridge".into(),
        bridge: "netd0".into(),
        subnet: "172.17.0.0/16".parse().unwrap(),
        gateway: "172.17.0.1".parse().unwrap(),
        icc: false,
        internal: false,
        masquerade: true,
        conntrack_limit: None,
    };
    let port = PortSpec {
        network_id: 1,
        proto: Protocol::Udp,
        host_ip: Some("198.18.0.2".parse().unwrap()),
        host_port: 5353,
        container_ip: "172.17.0.2".parse().unwrap(),
        container_port: 53,
        allow: vec![],
    };
    // The iptables datapath needs no bpffs: this directory is never opened.
    let datapaths = datapath::Datapaths {
        bpffs: env.bpffs.clone(),
        tuning: Default::default(),
    };
    netns::run_in(Some(&env.host_ns()), || {
        let dp = datapaths.open(datapath::DatapathKind::Iptables)?;
        dp.setup_network(&net)?;
        dp.publish(&net, std::slice::from_ref(&port))
    })
    .unwrap();

    let rules = iptables_save(&env);
    for expected in [
        "-A PREROUTING -m addrtype --dst-type LOCAL -j NETD",
        "-A POSTROUTING -s 172.17.0.0/16 ! -o netd0 -j MASQUERADE",
        "-A NETD -d 198.18.0.2/32 -p udp -m udp --dport 5353 -j DNAT --to-destination 172.17.0.2:53",
        "-A FORWARD -i netd0 -o netd0 -j DROP",
        "-A NETD-ISOLATION-STAGE-2 -o netd0 -j DROP",
    ] {
        assert!(
            rules.contains(expected),
            "missing {expected:?} in:\n{rules}"
        );
    }
    // Docker's order: the USER chain first, then isolation, then the bridge's rules.
    let forward: Vec<&str> = rules
        .lines()
        .filter(|l| l.starts_with("-A FORWARD"))
        .collect();
    assert_eq!(forward[0], "-A FORWARD -j NETD-USER", "{forward:?}");
    assert_eq!(
        forward[1], "-A FORWARD -j NETD-ISOLATION-STAGE-1",
        "{forward:?}"
    );

    netns::run_in(Some(&env.host_ns()), || {
        let dp = datapaths.open(datapath::DatapathKind::Iptables)?;
        dp.unpublish(&net, std::slice::from_ref(&port))?;
        dp.teardown_network(&net)
    })
    .unwrap();
    let rules = iptables_save(&env);
    assert!(!rules.contains("NETD"), "left behind:\n{rules}");
}
