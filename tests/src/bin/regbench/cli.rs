//! The command line: which mode to run (`--gateway`, `--ldap`, `--sso`, `--federation`,
//! `--audit`, `--ha`, `--s3`, `--gc`, `--scale`, `--scale-gc-blobs`, `--cache`, `--console`, or the plain
//! comparison)
//! and the sizes of each workload.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Registry push/pull/manifest benchmark")]
pub(crate) struct Args {
    /// A registry to measure, `name=http://host:port` (repeatable). Default: start
    /// storage-backend and distribution 2.8.2 and compare them.
    #[arg(long)]
    pub(crate) target: Vec<String>,
    /// Number of small blobs.
    #[arg(long, default_value_t = 64)]
    pub(crate) blobs: usize,
    /// Size of each small blob, MiB.
    #[arg(long, default_value_t = 1)]
    pub(crate) blob_mib: usize,
    /// Concurrency for small blobs.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Size of the big blob, MiB.
    #[arg(long, default_value_t = 1024)]
    pub(crate) big_mib: usize,
    /// Manifest GETs.
    #[arg(long, default_value_t = 20000)]
    pub(crate) manifest_gets: usize,
    /// Concurrency for manifest GETs.
    #[arg(long, default_value_t = 32)]
    pub(crate) manifest_concurrency: usize,
    /// Rounds of each measurement; the best is kept.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Measure the gateway over TLS with tokens (`gateway serve` + storage-backend) against
    /// nginx (blob pull) and distribution 2.8.2, then token issuance.
    #[arg(long)]
    pub(crate) gateway: bool,
    /// `--gateway`: size of the blob pulled from the gateway and from nginx, MiB.
    #[arg(long, default_value_t = 256)]
    pub(crate) pull_mib: usize,
    /// `--gateway`: token requests per kind.
    #[arg(long, default_value_t = 200)]
    pub(crate) tokens: usize,
    /// `--gateway`: concurrency of token requests.
    #[arg(long, default_value_t = 8)]
    pub(crate) token_concurrency: usize,
    /// Measure LDAP logins at the token endpoint (a real slapd): cached and uncached token
    /// issuance next to slapd's own bind rate, and a login with 50 groups.
    #[arg(long)]
    pub(crate) ldap: bool,
    /// `--ldap`: cached token requests.
    #[arg(long, default_value_t = 20000)]
    pub(crate) ldap_cached: usize,
    /// `--ldap`: uncached logins and raw binds.
    #[arg(long, default_value_t = 2000)]
    pub(crate) ldap_uncached: usize,
    /// Measure `POST /token` with `grant_type=refresh_token` for a session made by single
    /// sign-on (a real OpenID provider), against the gateway's JWKS GET as reference.
    #[arg(long)]
    pub(crate) sso: bool,
    /// `--sso`: refresh grants (and reference requests) per measurement.
    #[arg(long, default_value_t = 20000)]
    pub(crate) sso_grants: usize,
    /// Measure CI federation: a CI job's OIDC token (from a real OpenID provider) traded at
    /// `POST /token` (jwt-bearer) and as a Basic password, with the issuer's keys cached,
    /// against the gateway's JWKS GET as reference.
    #[arg(long)]
    pub(crate) federation: bool,
    /// Measure the audit trail's cost: manifest GETs through a gateway with audit on (file
    /// and syslog over TCP to a real rsyslogd) against one with audit off, same storage node.
    #[arg(long)]
    pub(crate) audit: bool,
    /// Measure the load-balanced deployment: HAProxy in front of two gateways (state in a
    /// real Redis) and two storage nodes on one root, against one gateway and one storage
    /// node; then token issuance with the Redis store against the in-memory one.
    #[arg(long)]
    pub(crate) ha: bool,
    /// Measure object storage: storage-backend on S3 (a real `moto_server`) against
    /// storage-backend on the filesystem, and a plain S3 client against moto (moto's own
    /// cost); `--blobs` small blobs and `--s3-big-blobs` × `--s3-big-mib` big ones.
    #[arg(long)]
    pub(crate) s3: bool,
    #[arg(long, default_value_t = 4)]
    pub(crate) s3_big_blobs: usize,
    #[arg(long, default_value_t = 256)]
    pub(crate) s3_big_mib: usize,
    /// Measure garbage collection: a store of `--gc-repos` repositories with an image of
    /// `--gc-layers` layers each (a fifth of them deleted), GC's duration, and pull
    /// throughput with and without a GC running.
    #[arg(long)]
    pub(crate) gc: bool,
    #[arg(long, default_value_t = 1000)]
    pub(crate) gc_repos: usize,
    #[arg(long, default_value_t = 8)]
    pub(crate) gc_layers: usize,
    /// Pulls (manifest by tag + one layer) per measurement.
    #[arg(long, default_value_t = 20000)]
    pub(crate) gc_pulls: usize,
    /// Measure listings at scale: a registry:2 root written directly at each of
    /// `--scale-sizes` (that many repositories, and that many tags in one repository), served
    /// by storage-backend and distribution 2.8.2 in turn: catalog and tag pages, a manifest
    /// GET; the growth from the smallest size to each larger one.
    #[arg(long)]
    pub(crate) scale: bool,
    /// Measure a pull-through cache (`[[proxy_cache]]` of distribution 2.8.2): a warm pull
    /// through the cache against the same blob pulled from an ordinary repository of the same
    /// gateway and storage, and a cold pull against pulling straight from the upstream
    /// (`--pull-mib` blobs, `--rounds` rounds).
    #[arg(long)]
    pub(crate) cache: bool,
    /// `--cache`: the cold pull is measured again with the upstream behind a link of each of
    /// these many MiB/s (a relay that paces it), as a registry on the internet is.
    #[arg(long, value_delimiter = ',', default_value = "100,400")]
    pub(crate) cache_link_mib: Vec<u64>,
    /// Measure the web console's pages at each of `--scale-sizes` repositories (a registry:2
    /// root written directly, `gateway serve` in front of one storage node): the repositories
    /// list, its next page and search, a tag page, a manifest page, for an administrator, a
    /// team member and a person who may see one repository.
    #[arg(long)]
    pub(crate) console: bool,
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 100_000])]
    pub(crate) scale_sizes: Vec<usize>,
    /// `--scale`: sequential GETs per measurement (the median is kept).
    #[arg(long, default_value_t = 25)]
    pub(crate) scale_gets: usize,
    /// Measure a GC dry run at scale (with or without `--scale`): a registry:2 root of this
    /// many distinct blobs in `--scale-gc-repos` repositories, `storage-backend gc --dry-run`
    /// and distribution's `garbage-collect --dry-run` on it, their wall time and peak RSS.
    /// 1 000 000 blobs make some 5 million files and directories: ~21 GB on ext4 with 4 KiB
    /// blocks, ~2 GB with `inline_data` (see `--scratch`; docs/benchmarks.md).
    #[arg(long, default_value_t = 0)]
    pub(crate) scale_gc_blobs: usize,
    #[arg(long, default_value_t = 100_000)]
    pub(crate) scale_gc_repos: usize,
    /// `--scale-gc-blobs`: write the root here and keep it, or measure the one already
    /// there (written by an earlier run with the same sizes): for profiling, or measuring
    /// again without writing 5 million files.
    #[arg(long)]
    pub(crate) scale_gc_root: Option<std::path::PathBuf>,
    /// `--scale-gc-blobs`: after the dry runs, a real GC run on the root by a storage node
    /// serving pulls all along: its time and peak RSS, the pulls' rate and failures, then a
    /// check of what is left. Deletes the root's garbage (a kept `--scale-gc-root` has none
    /// left for the next run's dry runs).
    #[arg(long)]
    pub(crate) scale_gc_live: bool,
    /// Tag pages on S3 (moto): a repository of each of `--scale-s3-tags` tags in a bucket,
    /// served by storage-backend and by distribution on it.
    #[arg(long)]
    pub(crate) scale_s3: bool,
    #[arg(long, value_delimiter = ',', default_values_t = [1000, 20_000])]
    pub(crate) scale_s3_tags: Vec<usize>,
    /// Where the scratch directory (stores, layouts) is made; default: the workspace's
    /// `target/`.
    #[arg(long)]
    pub(crate) scratch: Option<std::path::PathBuf>,
}
