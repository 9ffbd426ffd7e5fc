//! netd's state: an SQLite database, `STATE_DIR/state.db`, one row per network, container,
//! published port and `--link`, so every change writes the rows it changes and nothing else
//! (publishing one more port is one insert, whatever the number of mappings).
//!
//! - Atomic and crash-safe: each change is one transaction in write-ahead-log mode; a process
//!   killed at any point leaves the old or the new state.
//! - Readers are never blocked: listings, `inspect`, `port` and `exec` read a snapshot with no
//!   lock, whatever a writer (or a `netd exec ... sleep 600`) is doing.
//! - Commands that change the kernel take [`Store::lock`] (a flock on `STATE_DIR/lock`) for
//!   their kernel work only, so they don't interleave half-made bridges and programs.
//! - Everything is recorded before its kernel objects exist (status `creating`, with the pid
//!   of the process making it) and stays recorded until they are gone (`removing`), so `gc`
//!   finishes or undoes what a killed command left.
//!
//! Schema (version [`SCHEMA_VERSION`], in `PRAGMA user_version`):
//!
//! | table | key | what |
//! | --- | --- | --- |
//! | `networks` | `name`; `id`, `bridge` unique | status, owner pid, the record as JSON |
//! | `containers` | `name`; (`network`, `ip`), (`network`, `ip6`) unique; (`network`, `mac`) indexed | status, owner pid, namespace owner (`shares`), the record as JSON (ports apart) |
//! | `ports` | (`proto`, `host_port`) indexed; `container` indexed | one published port, its status and owner pid |
//! | `links` | `target` indexed | a `--link`: `container` links to `target` |
//! | `pending_links` | (`a`, `b`) | a `netd link` being made: its two interface names and owner pid |
//! | `link_addresses` | `ip` | a `netd link` end's address from the link pool, by container |
//! | `meta` | `key` | `next_network_id` |
//! | `ipam_pools` | `subnet` | a pool an engine's IPAM (Docker's) handed out, until released |
//! | `ipam_addresses` | (`subnet`, `ip`) | an address it handed out from a pool, until released |
//!
//! A `state.json` left by an older netd is imported on first open (then renamed
//! `state.json.migrated`).

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{
    Connection, OptionalExtension as _, Transaction, TransactionBehavior, config::DbConfig, params,
};

pub mod model;

use crate::datapath::Protocol;
use model::PortMapping;
pub use model::{Container, Network, State, Status};

/// The schema this netd writes; an older database is migrated on open.
pub const SCHEMA_VERSION: i64 = 4;

/// Pages of write-ahead log after which a commit checkpoints it (SQLite's default is 1,000):
/// a create or remove writes about 20.
const WAL_CHECKPOINT_PAGES: i64 = 256;

const SCHEMA: &str = "
CREATE TABLE networks (
    name TEXT PRIMARY KEY,
    id INTEGER NOT NULL UNIQUE,
    bridge TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE containers (
    name TEXT PRIMARY KEY,
    network TEXT,
    ip TEXT,
    shares TEXT,
    status TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE UNIQUE INDEX containers_address ON containers(network, ip) WHERE ip IS NOT NULL;
CREATE INDEX containers_shares ON containers(shares) WHERE shares IS NOT NULL;
CREATE INDEX containers_pending ON containers(status) WHERE status != 'running';
CREATE TABLE ports (
    container TEXT NOT NULL,
    proto TEXT NOT NULL,
    host_ip TEXT,
    host_port INTEGER NOT NULL,
    container_port INTEGER NOT NULL,
    status TEXT NOT NULL,
    owner_pid INTEGER NOT NULL
);
CREATE INDEX ports_host ON ports(proto, host_port);
CREATE INDEX ports_container ON ports(container);
CREATE INDEX ports_pending ON ports(status) WHERE status != 'running';
CREATE TABLE links (container TEXT NOT NULL, target TEXT NOT NULL);
CREATE INDEX links_target ON links(target);
CREATE INDEX links_container ON links(container);
CREATE TABLE pending_links (
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    end_a TEXT NOT NULL,
    end_b TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    PRIMARY KEY (a, b)
);
CREATE TABLE link_addresses (ip TEXT PRIMARY KEY, container TEXT NOT NULL);
CREATE INDEX link_addresses_container ON link_addresses(container);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

/// What brings a database of version `i + 1` (the first is [`SCHEMA`]) to version `i + 2`.
const MIGRATIONS: &[&str] = &[
    // 2: the pools and addresses an engine's IPAM (Docker's) handed out before a netd network
    // or container holds them.
    "CREATE TABLE ipam_pools (subnet TEXT PRIMARY KEY);
     CREATE TABLE ipam_addresses (subnet TEXT NOT NULL, ip TEXT NOT NULL, PRIMARY KEY (subnet, ip));",
    // 3: a container's IPv6 address on a dual-stack network, unique per network like `ip`.
    "ALTER TABLE containers ADD COLUMN ip6 TEXT;
     CREATE UNIQUE INDEX containers_address6 ON containers(network, ip6) WHERE ip6 IS NOT NULL;",
    // 4: a container's MAC, one holder per network (checked by the planner: earlier versions
    // let two containers share one, so the index can't insist).
    "ALTER TABLE containers ADD COLUMN mac TEXT;
     UPDATE containers SET mac = json_extract(doc, '$.mac');
     CREATE INDEX containers_mac ON containers(network, mac) WHERE mac IS NOT NULL;",
];

/// What the planner reads: the few rows a change depends on, never the whole state.
pub trait View {
    fn network(&self, name: &str) -> Result<Option<Network>>;
    fn networks(&self) -> Result<Vec<Network>>;
    fn container(&self, name: &str) -> Result<Option<Container>>;
    /// The addresses (of both families) taken on network `name`.
    fn addresses_on(&self, network: &str) -> Result<HashSet<IpAddr>>;
    /// The container on network `network` with MAC `mac` (as written by `ipam::format_mac`).
    fn mac_holder(&self, network: &str, mac: &str) -> Result<Option<String>>;
    /// The addresses of `subnet` an engine's IPAM (Docker's) handed out, held or not.
    fn handed_out(&self, subnet: IpNet) -> Result<HashSet<IpAddr>>;
    /// A published port that takes the host address, port and protocol `m` would.
    fn port_clash(&self, m: &PortMapping) -> Result<Option<PortMapping>>;
    fn next_network_id(&self) -> Result<u32>;
}

/// The state dir: the database and the containers' /etc files.
pub struct Store {
    dir: PathBuf,
    db: Connection,
}

/// Held by a command while it changes kernel objects.
pub struct KernelLock(#[allow(dead_code)] Flock<File>);

impl Store {
    /// Whether `dir` holds a state (a netd ever ran on it).
    pub fn exists(dir: &Path) -> bool {
        Self::db_path(dir).exists()
    }

    fn db_path(dir: &Path) -> PathBuf {
        dir.join("state.db")
    }

    /// Opens (creating or migrating) the state under `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("create state dir {}", dir.display()))?;
        // Opening is one process at a time: switching a new database to WAL takes a lock the
        // busy timeout doesn't wait for, so commands started at once on a fresh state dir
        // failed with "database is locked". Held until the schema is migrated.
        let _opening = exclusive_lock(&dir.join("open.lock"))?;
        let path = Self::db_path(dir);
        let db = Connection::open(&path).with_context(|| format!("open {}", path.display()))?;
        // Writers wait for each other; readers never wait (WAL).
        db.busy_timeout(Duration::from_secs(60))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL syncs the log at checkpoints only, not at each commit: a killed process
        // loses nothing (its commits are in the page cache), and a power loss at worst rolls
        // the last commits back to a consistent earlier state, whose kernel objects (veths,
        // namespaces, pinned maps) the reboot took anyway.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        // Each command is a process of its own: checkpointing and deleting the log when it
        // closes the database cost four fsyncs a command (the new log, its directory, the
        // log and the database at the checkpoint) and an unlink. The log stays instead, and
        // is checkpointed by the commit that grows it past `wal_autocheckpoint` pages (kept
        // small, as the next process re-reads the log to rebuild its index).
        db.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        db.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
        let mut store = Self {
            dir: dir.to_path_buf(),
            db,
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a container's hosts, resolv.conf and hostname files live.
    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.dir.join("containers").join(name)
    }

    /// Takes the kernel lock, waiting for any other netd command changing the kernel.
    pub fn lock(&self) -> Result<KernelLock> {
        exclusive_lock(&self.dir.join("lock")).map(KernelLock)
    }

    /// Brings the schema to [`SCHEMA_VERSION`], importing a `state.json` into a new database.
    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .db
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            bail!(
                "the state in {} has schema version {version}, newer than this netd's {SCHEMA_VERSION}",
                self.dir.display()
            );
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let json = self.dir.join("state.json");
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Another process may have migrated while this one waited for the write lock.
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        let fresh = version == 0;
        if fresh {
            tx.execute_batch(SCHEMA)?;
        }
        for step in &MIGRATIONS[(version.max(1) - 1) as usize..] {
            tx.execute_batch(step)?;
        }
        if fresh && json.exists() {
            import_json(&tx, &json)?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        if fresh && json.exists() {
            fs::rename(&json, self.dir.join("state.json.migrated"))
                .with_context(|| format!("rename {}", json.display()))?;
        }
        Ok(())
    }

    /// Runs `change` in one transaction, taken for writing up front (so what it read is
    /// still true when it writes).
    pub fn write<T>(&mut self, change: impl FnOnce(&Tx) -> Result<T>) -> Result<T> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = change(&Tx(&tx))?;
        tx.commit().context("commit the state")?;
        Ok(out)
    }

    /// A consistent snapshot for reading.
    pub fn read<T>(&mut self, query: impl FnOnce(&Tx) -> Result<T>) -> Result<T> {
        let tx = self.db.transaction()?;
        query(&Tx(&tx))
    }
}

/// One row of `ports`.
#[derive(Clone, Debug)]
pub struct PortRow {
    pub container: String,
    pub mapping: PortMapping,
    pub status: Status,
    pub owner_pid: u32,
}

/// A `netd link` being made: recorded before its veth exists.
#[derive(Clone, Debug)]
pub struct PendingLink {
    pub a: String,
    pub b: String,
    pub end_a: String,
    pub end_b: String,
    pub owner_pid: u32,
}

/// Reads and writes within one transaction.
pub struct Tx<'a>(&'a Transaction<'a>);

fn ip_text(ip: Option<impl std::fmt::Display>) -> Option<String> {
    ip.map(|ip| ip.to_string())
}

fn proto_text(p: Protocol) -> &'static str {
    crate::core::ports::proto_name(p)
}

fn parse_proto(text: &str) -> Result<Protocol> {
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => bail!("unknown protocol {other:?} in the state"),
    }
}

fn from_doc<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).context("a record in the state")
}

impl Tx<'_> {
    pub fn container_required(&self, name: &str) -> Result<Container> {
        self.container(name)?
            .ok_or_else(|| anyhow::anyhow!("no container named {name:?}"))
    }

    pub fn network_required(&self, name: &str) -> Result<Network> {
        self.network(name)?
            .ok_or_else(|| anyhow::anyhow!("no network named {name:?}"))
    }

    pub fn containers(&self) -> Result<Vec<Container>> {
        self.containers_where("1", params![])
    }

    pub fn containers_on(&self, network: &str) -> Result<Vec<Container>> {
        self.containers_where("network = ?1", params![network])
    }

    /// Containers whose status is not `running`.
    pub fn pending_containers(&self) -> Result<Vec<Container>> {
        self.containers_where("status != 'running'", params![])
    }

    /// Containers that use `name`'s namespace (`--network container:NAME`).
    pub fn sharers_of(&self, name: &str) -> Result<Vec<String>> {
        self.names("SELECT name FROM containers WHERE shares = ?1", name)
    }

    /// Containers with a `--link` to `name`.
    pub fn linkers_of(&self, name: &str) -> Result<Vec<Container>> {
        let names = self.names("SELECT container FROM links WHERE target = ?1", name)?;
        names
            .iter()
            .filter_map(|n| self.container(n).transpose())
            .collect()
    }

    fn names(&self, sql: &str, arg: &str) -> Result<Vec<String>> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let rows = stmt.query_map(params![arg], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn containers_where(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<Container>> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT doc FROM containers WHERE {filter} ORDER BY name"
        ))?;
        let docs: Vec<String> = stmt
            .query_map(args, |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        docs.iter()
            .map(|doc| {
                let mut c: Container = from_doc(doc)?;
                c.ports = self.ports_of(&c.name)?;
                Ok(c)
            })
            .collect()
    }

    /// `name`'s published ports, in the order they were published.
    pub fn ports_of(&self, name: &str) -> Result<Vec<PortMapping>> {
        Ok(self.port_rows(name)?.into_iter().map(|(p, _)| p).collect())
    }

    /// `name`'s published ports with their status.
    pub fn port_rows(&self, name: &str) -> Result<Vec<(PortMapping, Status)>> {
        // In the order they were published (the index on `container` keeps rowid order).
        self.ports_where("container = ?1 ORDER BY rowid", params![name])
            .map(|rows| rows.into_iter().map(|r| (r.mapping, r.status)).collect())
    }

    /// Published ports not `running` (being published or unpublished), found through the partial index
    /// `ports_pending` (no ordering: an ORDER BY would make SQLite scan the whole table).
    pub fn pending_ports(&self) -> Result<Vec<PortRow>> {
        self.ports_where("status != 'running'", params![])
    }

    fn ports_where(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<PortRow>> {
        let mut stmt = self.0.prepare_cached(&format!(
            "SELECT container, proto, host_ip, host_port, container_port, status, owner_pid FROM ports WHERE {filter}"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, u16>(3)?,
                r.get::<_, u16>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, u32>(6)?,
            ))
        })?;
        rows.map(|row| {
            let (container, proto, host_ip, host_port, container_port, status, owner_pid) = row?;
            Ok(PortRow {
                container,
                mapping: PortMapping {
                    proto: parse_proto(&proto)?,
                    host_ip: host_ip.map(|ip| ip.parse()).transpose()?,
                    host_port,
                    container_port,
                },
                status: Status::from_name(&status)?,
                owner_pid,
            })
        })
        .collect()
    }

    /// Networks whose status is not `running`.
    pub fn pending_networks(&self) -> Result<Vec<Network>> {
        Ok(self
            .networks()?
            .into_iter()
            .filter(|n| n.status != Status::Running)
            .collect())
    }

    /// Container `name`'s record without its ports (what a change to one port needs).
    pub fn container_record(&self, name: &str) -> Result<Container> {
        match self.doc("SELECT doc FROM containers WHERE name = ?1", name)? {
            Some(doc) => from_doc(&doc),
            None => bail!("no container named {name:?}"),
        }
    }

    /// The `doc` column of the row `sql` selects by `name`.
    fn doc(&self, sql: &str, name: &str) -> Result<Option<String>> {
        Ok(self
            .0
            .prepare_cached(sql)?
            .query_row(params![name], |r| r.get(0))
            .optional()?)
    }

    /// Records that this process is making the `netd link` `link`.
    pub fn add_pending_link(&self, link: &PendingLink) -> Result<()> {
        self.0.execute(
            "INSERT INTO pending_links (a, b, end_a, end_b, owner_pid) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![link.a, link.b, link.end_a, link.end_b, link.owner_pid],
        )?;
        Ok(())
    }

    pub fn delete_pending_link(&self, a: &str, b: &str) -> Result<()> {
        self.0.execute(
            "DELETE FROM pending_links WHERE a = ?1 AND b = ?2",
            params![a, b],
        )?;
        Ok(())
    }

    pub fn pending_links(&self) -> Result<Vec<PendingLink>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT a, b, end_a, end_b, owner_pid FROM pending_links")?;
        let rows = stmt.query_map([], |r| {
            Ok(PendingLink {
                a: r.get(0)?,
                b: r.get(1)?,
                end_a: r.get(2)?,
                end_b: r.get(3)?,
                owner_pid: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records (or replaces) network `net`.
    pub fn put_network(&self, net: &Network) -> Result<()> {
        self.0.execute(
            // By name: a clash on `id` or `bridge` with another network is an error.
            "INSERT INTO networks (name, id, bridge, status, owner_pid, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(name) DO UPDATE SET id = excluded.id, bridge = excluded.bridge,
             status = excluded.status, owner_pid = excluded.owner_pid, doc = excluded.doc",
            params![
                net.name,
                net.id,
                net.bridge,
                net.status.name(),
                net.owner_pid,
                serde_json::to_string(net)?
            ],
        )?;
        Ok(())
    }

    pub fn delete_network(&self, name: &str) -> Result<()> {
        self.0
            .execute("DELETE FROM networks WHERE name = ?1", params![name])?;
        Ok(())
    }

    pub fn set_next_network_id(&self, id: u32) -> Result<()> {
        self.0.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_network_id', ?1)",
            params![id],
        )?;
        Ok(())
    }

    /// Records (or replaces) container `c`: its row and its `--link`s. Its ports are rows of
    /// their own (see [`Tx::add_ports`]).
    pub fn put_container(&self, c: &Container) -> Result<()> {
        let shares = match &c.mode {
            model::Mode::Container(other) => Some(other.as_str()),
            _ => None,
        };
        let doc = Container {
            ports: vec![],
            ..c.clone()
        };
        self.0.execute(
            // An upsert by name, not INSERT OR REPLACE: that would settle a clash on an
            // address index by deleting the other container's row.
            "INSERT INTO containers (name, network, ip, ip6, mac, shares, status, owner_pid, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(name) DO UPDATE SET network = excluded.network, ip = excluded.ip, ip6 = excluded.ip6,
             mac = excluded.mac, shares = excluded.shares, status = excluded.status, owner_pid = excluded.owner_pid, doc = excluded.doc",
            params![
                c.name,
                c.network,
                ip_text(c.ip),
                ip_text(c.ip6),
                c.mac,
                shares,
                c.status.name(),
                c.creator_pid,
                serde_json::to_string(&doc)?
            ],
        )?;
        self.0
            .execute("DELETE FROM links WHERE container = ?1", params![c.name])?;
        for link in &c.links {
            self.0.execute(
                "INSERT INTO links (container, target) VALUES (?1, ?2)",
                params![c.name, link.container],
            )?;
        }
        self.0.execute(
            "DELETE FROM link_addresses WHERE container = ?1",
            params![c.name],
        )?;
        for ip in c.peer_links.iter().filter_map(|l| l.ip) {
            self.0.execute(
                "INSERT INTO link_addresses (ip, container) VALUES (?1, ?2)",
                params![ip.to_string(), c.name],
            )?;
        }
        Ok(())
    }

    /// The addresses `netd link` ends took from the link pool.
    pub fn link_pool_addresses(&self) -> Result<HashSet<Ipv4Addr>> {
        let mut stmt = self.0.prepare_cached("SELECT ip FROM link_addresses")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|ip| Ok(ip?.parse()?)).collect()
    }

    /// Removes container `name` with its ports and links.
    pub fn delete_container(&self, name: &str) -> Result<()> {
        for sql in [
            "DELETE FROM containers WHERE name = ?1",
            "DELETE FROM ports WHERE container = ?1",
            "DELETE FROM links WHERE container = ?1",
            "DELETE FROM link_addresses WHERE container = ?1",
        ] {
            self.0.execute(sql, params![name])?;
        }
        Ok(())
    }

    /// Records published ports of container `name`.
    pub fn add_ports(&self, name: &str, ports: &[PortMapping], status: Status) -> Result<()> {
        let mut stmt = self.0.prepare_cached(
            "INSERT INTO ports (container, proto, host_ip, host_port, container_port, status, owner_pid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for p in ports {
            stmt.execute(params![
                name,
                proto_text(p.proto),
                ip_text(p.host_ip),
                p.host_port,
                p.container_port,
                status.name(),
                std::process::id()
            ])?;
        }
        Ok(())
    }

    /// Sets the status (and owner, this process) of container `name`'s ports `ports`.
    pub fn set_ports_status(
        &self,
        name: &str,
        ports: &[PortMapping],
        status: Status,
    ) -> Result<()> {
        let mut stmt = self.0.prepare_cached(
            "UPDATE ports SET status = ?1, owner_pid = ?2 WHERE container = ?3 AND proto = ?4 AND host_port = ?5 AND host_ip IS ?6",
        )?;
        for p in ports {
            stmt.execute(params![
                status.name(),
                std::process::id(),
                name,
                proto_text(p.proto),
                p.host_port,
                ip_text(p.host_ip)
            ])?;
        }
        Ok(())
    }

    /// Leaves container `name`'s ports `ports` with no owner (a removal that failed), for
    /// `gc` to finish.
    pub fn disown_ports(&self, name: &str, ports: &[PortMapping]) -> Result<()> {
        let mut stmt = self.0.prepare_cached(
            "UPDATE ports SET owner_pid = 0 WHERE container = ?1 AND proto = ?2 AND host_port = ?3 AND host_ip IS ?4",
        )?;
        for p in ports {
            stmt.execute(params![
                name,
                proto_text(p.proto),
                p.host_port,
                ip_text(p.host_ip)
            ])?;
        }
        Ok(())
    }

    /// The pools an engine's IPAM handed out (until released).
    pub fn ipam_pools(&self) -> Result<Vec<IpNet>> {
        let mut stmt = self.0.prepare_cached("SELECT subnet FROM ipam_pools")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|s| Ok(s?.parse()?)).collect()
    }

    pub fn add_ipam_pool(&self, subnet: IpNet) -> Result<()> {
        self.0.execute(
            "INSERT OR IGNORE INTO ipam_pools (subnet) VALUES (?1)",
            params![subnet.to_string()],
        )?;
        Ok(())
    }

    /// Forgets pool `subnet` and the addresses handed out from it.
    pub fn delete_ipam_pool(&self, subnet: IpNet) -> Result<()> {
        for sql in [
            "DELETE FROM ipam_pools WHERE subnet = ?1",
            "DELETE FROM ipam_addresses WHERE subnet = ?1",
        ] {
            self.0.execute(sql, params![subnet.to_string()])?;
        }
        Ok(())
    }

    /// The addresses an engine's IPAM handed out from pool `subnet` (until released).
    pub fn ipam_addresses(&self, subnet: IpNet) -> Result<HashSet<IpAddr>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT ip FROM ipam_addresses WHERE subnet = ?1")?;
        let rows = stmt.query_map(params![subnet.to_string()], |r| r.get::<_, String>(0))?;
        rows.map(|ip| Ok(ip?.parse()?)).collect()
    }

    pub fn add_ipam_address(&self, subnet: IpNet, ip: IpAddr) -> Result<()> {
        self.0.execute(
            "INSERT OR IGNORE INTO ipam_addresses (subnet, ip) VALUES (?1, ?2)",
            params![subnet.to_string(), ip.to_string()],
        )?;
        Ok(())
    }

    pub fn delete_ipam_address(&self, subnet: IpNet, ip: IpAddr) -> Result<()> {
        self.0.execute(
            "DELETE FROM ipam_addresses WHERE subnet = ?1 AND ip = ?2",
            params![subnet.to_string(), ip.to_string()],
        )?;
        Ok(())
    }

    pub fn delete_ports(&self, name: &str, ports: &[PortMapping]) -> Result<()> {
        let mut stmt = self.0.prepare_cached(
            "DELETE FROM ports WHERE container = ?1 AND proto = ?2 AND host_port = ?3 AND host_ip IS ?4",
        )?;
        for p in ports {
            stmt.execute(params![
                name,
                proto_text(p.proto),
                p.host_port,
                ip_text(p.host_ip)
            ])?;
        }
        Ok(())
    }
}

impl View for Tx<'_> {
    fn network(&self, name: &str) -> Result<Option<Network>> {
        self.doc("SELECT doc FROM networks WHERE name = ?1", name)?
            .map(|d| from_doc(&d))
            .transpose()
    }

    fn networks(&self) -> Result<Vec<Network>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT doc FROM networks ORDER BY name")?;
        let docs: Vec<String> = stmt
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        docs.iter().map(|d| from_doc(d)).collect()
    }

    fn container(&self, name: &str) -> Result<Option<Container>> {
        Ok(self
            .containers_where("name = ?1", params![name])?
            .into_iter()
            .next())
    }

    fn addresses_on(&self, network: &str) -> Result<HashSet<IpAddr>> {
        let mut stmt = self.0.prepare_cached(
            "SELECT ip FROM containers WHERE network = ?1 AND ip IS NOT NULL
             UNION ALL SELECT ip6 FROM containers WHERE network = ?1 AND ip6 IS NOT NULL",
        )?;
        let rows = stmt.query_map(params![network], |r| r.get::<_, String>(0))?;
        rows.map(|ip| Ok(ip?.parse()?)).collect()
    }

    fn handed_out(&self, subnet: IpNet) -> Result<HashSet<IpAddr>> {
        self.ipam_addresses(subnet)
    }

    fn mac_holder(&self, network: &str, mac: &str) -> Result<Option<String>> {
        Ok(self
            .0
            .query_row(
                "SELECT name FROM containers WHERE network = ?1 AND mac = ?2",
                params![network, mac],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The few rows on the same protocol and port (indexed), then `ports::clash` on them:
    /// which addresses cover which is its rule alone.
    fn port_clash(&self, m: &PortMapping) -> Result<Option<PortMapping>> {
        let mut stmt = self
            .0
            .prepare_cached("SELECT host_ip FROM ports WHERE proto = ?1 AND host_port = ?2")?;
        let rows = stmt.query_map(params![proto_text(m.proto), m.host_port], |r| {
            r.get::<_, Option<String>>(0)
        })?;
        for host_ip in rows {
            let taken = PortMapping {
                host_ip: host_ip?.map(|ip| ip.parse()).transpose()?,
                ..m.clone()
            };
            if crate::core::ports::clash(&taken, m) {
                return Ok(Some(taken));
            }
        }
        Ok(None)
    }

    fn next_network_id(&self) -> Result<u32> {
        let id: Option<u32> = self
            .0
            .query_row(
                "SELECT value FROM meta WHERE key = 'next_network_id'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(id.unwrap_or(1).max(1))
    }
}

/// The in-memory state answers the planner too (its unit tests, the migration).
impl View for State {
    fn network(&self, name: &str) -> Result<Option<Network>> {
        Ok(self.networks.get(name).cloned())
    }

    fn networks(&self) -> Result<Vec<Network>> {
        Ok(self.networks.values().cloned().collect())
    }

    fn container(&self, name: &str) -> Result<Option<Container>> {
        Ok(self.containers.get(name).cloned())
    }

    fn addresses_on(&self, network: &str) -> Result<HashSet<IpAddr>> {
        Ok(self
            .containers_on(network)
            .flat_map(|c| [c.ip.map(IpAddr::from), c.ip6.map(IpAddr::from)])
            .flatten()
            .collect())
    }

    /// The in-memory state has no engine's IPAM.
    fn handed_out(&self, _subnet: IpNet) -> Result<HashSet<IpAddr>> {
        Ok(HashSet::new())
    }

    fn mac_holder(&self, network: &str, mac: &str) -> Result<Option<String>> {
        Ok(self
            .containers_on(network)
            .find(|c| c.mac.as_deref() == Some(mac))
            .map(|c| c.name.clone()))
    }

    fn port_clash(&self, m: &PortMapping) -> Result<Option<PortMapping>> {
        Ok(self
            .containers
            .values()
            .flat_map(|c| &c.ports)
            .find(|p| crate::core::ports::clash(p, m))
            .cloned())
    }

    fn next_network_id(&self) -> Result<u32> {
        Ok(self.next_network_id.max(1))
    }
}

/// Imports the JSON document of netd before the database.
fn import_json(tx: &Transaction, path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let state: State =
        serde_json::from_slice(&bytes).with_context(|| format!("read {}", path.display()))?;
    let tx = Tx(tx);
    for net in state.networks.values() {
        tx.put_network(net)?;
    }
    for c in state.containers.values() {
        tx.put_container(c)?;
        tx.add_ports(&c.name, &c.ports, Status::Running)?;
    }
    tx.set_next_network_id(state.next_network_id)
}

/// An exclusive `flock` on `path` (made if missing), waiting for whoever holds it.
fn exclusive_lock(path: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("lock {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state.json as netd wrote it before the database (one network, two containers, one
    /// with published ports and a link).
    const OLD_STATE: &str = r#"{
  "networks": {"n": {"id": 3, "name": "n", "bridge": "netd-br3", "subnet": "10.9.0.0/24",
    "gateway": "10.9.0.1", "ip_range": "10.9.0.0/24", "mtu": 1500, "icc": true,
    "internal": false, "masquerade": true, "host_ip": null, "datapath": "iptables"}},
  "containers": {
    "db": {"name": "db", "status": "running", "creator_pid": 1, "mode": {"kind": "bridge"},
      "netns": "/run/netns/db", "owns_netns": true, "network": "n", "ip": "10.9.0.2",
      "mac": "02:42:0a:09:00:02", "host_veth": "veth0000001", "hostname": "db", "dns": [],
      "dns_search": [], "add_hosts": [], "links": [], "peer_links": [],
      "ports": [{"proto": "tcp", "host_ip": null, "host_port": 8080, "container_port": 80},
                {"proto": "udp", "host_ip": "198.18.0.2", "host_port": 53, "container_port": 53}]},
    "web": {"name": "web", "status": "running", "creator_pid": 1, "mode": {"kind": "bridge"},
      "netns": "/run/netns/web", "owns_netns": true, "network": "n", "ip": "10.9.0.3",
      "mac": "02:42:0a:09:00:03", "host_veth": "veth0000002", "hostname": "web", "dns": [],
      "dns_search": [], "add_hosts": [], "links": [{"container": "db", "alias": "d"}],
      "peer_links": [], "ports": []}
  },
  "next_network_id": 4
}"#;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("netd-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn migrates_the_json_document() {
        let dir = temp_dir("migrate");
        fs::write(dir.join("state.json"), OLD_STATE).unwrap();
        let mut store = Store::open(&dir).unwrap();
        assert!(!dir.join("state.json").exists());
        assert!(dir.join("state.json.migrated").exists());
        store
            .read(|tx| {
                let net = tx.network_required("n")?;
                assert_eq!((net.id, net.status), (3, Status::Running));
                assert_eq!(net.datapath, crate::datapath::DatapathKind::Iptables);
                assert_eq!(tx.next_network_id()?, 4);
                let db = tx.container_required("db")?;
                assert_eq!(db.ports.len(), 2);
                assert_eq!(db.ports[1].host_ip, Some("198.18.0.2".parse()?));
                assert_eq!(tx.addresses_on("n")?.len(), 2);
                let linkers = tx.linkers_of("db")?;
                assert_eq!(linkers.len(), 1);
                assert_eq!(linkers[0].name, "web");
                let clash = PortMapping {
                    proto: Protocol::Tcp,
                    host_ip: Some("198.18.0.9".parse()?),
                    host_port: 8080,
                    container_port: 1,
                };
                assert!(tx.port_clash(&clash)?.is_some());
                let free = PortMapping {
                    proto: Protocol::Udp,
                    host_ip: Some("198.18.0.9".parse()?),
                    host_port: 53,
                    container_port: 1,
                };
                assert!(tx.port_clash(&free)?.is_none());
                Ok(())
            })
            .unwrap();
        // Opened again: already migrated, nothing imported twice.
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        let n = store.read(|tx| Ok(tx.ports_of("db")?.len())).unwrap();
        assert_eq!(n, 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commands_started_at_once_all_open_a_new_state() {
        for round in 0..20 {
            let dir = temp_dir(&format!("at-once-{round}"));
            let start = std::sync::Barrier::new(8);
            let opened: Vec<Result<()>> = std::thread::scope(|s| {
                let opens: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            Store::open(&dir).map(drop)
                        })
                    })
                    .collect();
                opens.into_iter().map(|o| o.join().unwrap()).collect()
            });
            fs::remove_dir_all(&dir).unwrap();
            for o in opened {
                o.unwrap();
            }
        }
    }

    #[test]
    fn migrates_schema_1() {
        let dir = temp_dir("v1");
        let db = Connection::open(dir.join("state.db")).unwrap();
        db.execute_batch(SCHEMA).unwrap();
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('next_network_id', 7)",
            [],
        )
        .unwrap();
        db.execute(
            "INSERT INTO containers (name, network, ip, status, owner_pid, doc)
             VALUES ('db', 'n', '10.9.0.2', 'running', 1, '{\"mac\": \"02:42:0a:09:00:02\"}')",
            [],
        )
        .unwrap();
        db.pragma_update(None, "user_version", 1).unwrap();
        drop(db);
        let mut store = Store::open(&dir).unwrap();
        let subnet: IpNet = "10.66.0.0/24".parse().unwrap();
        store
            .write(|tx| {
                assert_eq!(tx.next_network_id()?, 7);
                // The MAC in a container's record is indexed.
                assert_eq!(
                    tx.mac_holder("n", "02:42:0a:09:00:02")?.as_deref(),
                    Some("db")
                );
                tx.add_ipam_pool(subnet)?;
                tx.add_ipam_address(subnet, "10.66.0.1".parse()?)
            })
            .unwrap();
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        let (pools, addresses) = store
            .read(|tx| Ok((tx.ipam_pools()?, tx.ipam_addresses(subnet)?)))
            .unwrap();
        assert_eq!(pools, [subnet]);
        assert_eq!(addresses.len(), 1);
        let version: i64 = store
            .db
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ipv6_addresses_are_unique_per_network() {
        let dir = temp_dir("ipv6");
        fs::write(dir.join("state.json"), OLD_STATE).unwrap();
        let mut store = Store::open(&dir).unwrap();
        let mut db = store.read(|tx| tx.container_required("db")).unwrap();
        db.ip6 = Some("fd00:9::2".parse().unwrap());
        store.write(|tx| tx.put_container(&db)).unwrap();
        let addresses = store.read(|tx| tx.addresses_on("n")).unwrap();
        assert!(
            addresses.contains(&"fd00:9::2".parse().unwrap()),
            "{addresses:?}"
        );
        let mut web = store.read(|tx| tx.container_required("web")).unwrap();
        web.ip6 = db.ip6;
        let clash = store.write(|tx| tx.put_container(&web));
        assert!(clash.unwrap_err().to_string().contains("UNIQUE"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = temp_dir("newer");
        let db = Connection::open(dir.join("state.db")).unwrap();
        db.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(db);
        let err = Store::open(&dir).err().unwrap().to_string();
        assert!(err.contains("newer"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_change_leaves_nothing() {
        let dir = temp_dir("atomic");
        let mut store = Store::open(&dir).unwrap();
        let err: Result<()> = store.write(|tx| {
            tx.set_next_network_id(9)?;
            anyhow::bail!("no")
        });
        assert!(err.is_err());
        assert_eq!(store.read(|tx| tx.next_network_id()).unwrap(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
