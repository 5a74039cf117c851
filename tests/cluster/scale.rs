//! The default partition count (issue 15): with 4096 partitions the two
//! nodes of the measured setup lost their leases under load (all of one
//! node's renewals one after another; every stored record checked by all
//! 4,096 consumers of the one stream). Here two nodes split the default
//! count on one nats-server, keep every lease, and carry messages both
//! ways with every tick. And the upgrade from the single stream `TERN`
//! of the layout before.

use tern::cluster::ClusterConfig;
use tern::proto::ReceiptKind;
use tern_client::Client;

use super::common::{expect_receipt, indexed_body, recv_ack, recv_deliver, TestServer};
use super::nats::{free_port, Nats};
use super::{login_v2, settle_halves, user_on_each};

/// Partitions of a `[cluster]` section that names none.
const DEFAULT_PARTITIONS: u64 = 4096;

/// Messages each way.
const MESSAGES: u64 = 5;

/// A node from a `[cluster]` section with only the required keys (so 4096
/// partitions and 10 s leases), reachable at its `public_addr`. Not the
/// 3 s leases of the other tests: on the shared 2-core box a debug build's
/// lease round for 2,048 partitions took 0.3-1.5 s, too close to a 3 s
/// lease renewed every second.
fn default_node(nats: &Nats, id: &str) -> TestServer {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let text = format!(
        "node_id = {id:?}\nnats_urls = {:?}\npublic_addr = \"{addr}\"\n",
        nats.urls()
    );
    let cluster: ClusterConfig = toml::from_str(&text).expect("cluster section");
    assert_eq!(u64::from(cluster.partitions), DEFAULT_PARTITIONS);
    TestServer::start_with(|c| {
        c.listen = addr;
        c.cluster = Some(cluster);
    })
}

/// [`MESSAGES`] from `from` to `to`, each ACKed, delivered in order with
/// its ACK's server id, then DELIVERED and READ with both receipts back.
fn exchange((from, sender): (u64, &mut Client), (to, recipient): (u64, &mut Client)) {
    let mut ids = Vec::new();
    for i in 1..=MESSAGES {
        sender.send_msg(i, to, &indexed_body(i, 32)).expect("send");
        ids.push(recv_ack(sender, i));
    }
    for (i, &id) in (1..=MESSAGES).zip(&ids) {
        let got = recv_deliver(recipient);
        assert_eq!((got.server_id, got.from), (id, from), "message {i}");
        assert_eq!(got.body, indexed_body(i, 32));
        recipient.send_delivered(id).expect("delivered");
        expect_receipt(sender, ReceiptKind::Delivered, id, to);
        recipient.send_read(id, from).expect("read");
        expect_receipt(sender, ReceiptKind::Read, id, to);
    }
}

#[test]
fn two_nodes_split_the_default_partitions_and_carry_messages() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    let Some(nats) = Nats::start() else { return };
    let a = default_node(&nats, "a");
    let b = default_node(&nats, "b");
    settle_halves(&a, &b, DEFAULT_PARTITIONS);
    assert_eq!(a.info_u64("Cluster_stream_replicas"), 1);

    let (x, y) = user_on_each(&a);
    let mut cx = login_v2(a.addr, x);
    let mut cy = login_v2(a.addr, y);
    assert_eq!(cy.peer_addr().expect("peer"), b.addr);
    exchange((x, &mut cx), (y, &mut cy));
    exchange((y, &mut cy), (x, &mut cx));
    // Every renewal of 2,048 leases per node kept up.
    assert_eq!(a.info_u64("Cluster_leases_lost"), 0);
    assert_eq!(b.info_u64("Cluster_leases_lost"), 0);
}

/// Runs `f` against JetStream at `url` on a runtime of its own, as an
/// operator's tool would.
pub(super) fn with_jetstream<T>(
    url: &str,
    f: impl AsyncFnOnce(async_nats::jetstream::Context) -> T,
) -> T {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect to NATS");
        f(async_nats::jetstream::new(client)).await
    })
}

/// Upgrade from the single stream `TERN` of earlier versions
/// (docs/CLUSTER.md, "Streams"): while it holds a record a node claims
/// nothing; once it is empty the node deletes it and serves.
#[test]
fn the_old_single_stream_blocks_until_empty_then_goes() {
    if super::common::pass::first_pass_only(super::ABOVE_THE_BACKEND) {
        return;
    }
    use async_nats::jetstream::stream;
    let Some(nats) = Nats::start() else { return };
    let url = nats.url();
    with_jetstream(&url, async |js| {
        js.create_stream(stream::Config {
            name: "TERN".into(),
            subjects: vec!["tern.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .expect("create TERN");
        js.publish("tern.p.0", "waiting".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    });
    let a = default_node(&nats, "a");
    // The first lease round runs at start, the next 3.3 s later: both
    // refused.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(a.info_u64("Cluster_nats_up"), 0);
    assert_eq!(a.info_u64("Cluster_partitions_owned"), 0);

    with_jetstream(&url, async |js| {
        let old = js.get_stream("TERN").await.expect("TERN still there");
        old.purge().await.expect("purge");
    });
    a.wait_info("Cluster_partitions_owned", |n| n == DEFAULT_PARTITIONS);
    assert_eq!(a.info_u64("Cluster_nats_up"), 1);
    let gone = with_jetstream(&url, async |js| js.get_stream("TERN").await.is_err());
    assert!(gone, "the empty TERN was not deleted");
}
