//! Tier 5: Kafka policy end to end, as Cilium's "Securing a Kafka cluster"
//! guide walks it: the real Apache Kafka broker (KRaft, from Maven Central;
//! `fibril-echo kafka-broker`) in a lab pod, Kafka's own console and
//! performance tools as the Empire's producers and consumers in other pods,
//! and the corpus's Star Wars policy (`kafka-sw-security-policy.yaml`)
//! imported as it is. Needs root, Java 17+ and `cargo xtask deps` (the
//! jars).

mod common;

use std::time::Duration;

use common::{eventually, Lab};
use serde_json::Value;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
pods:
  - name: kafka
    labels: {app: kafka}
    command: [fibril-echo, kafka-broker, --lib, "LIB_HERE", --data, "DATA_HERE", --heap-mb, "384"]
  - {name: empire-hq, labels: {app: empire-hq}}
  - {name: empire-outpost, labels: {app: empire-outpost}}
  - {name: empire-backup, labels: {app: empire-backup}}
"#;

/// kafka .2, empire-hq .3, empire-outpost .4, empire-backup .5.
struct KafkaLab {
    lab: Lab,
    lib: String,
    data: std::path::PathBuf,
}

impl Drop for KafkaLab {
    fn drop(&mut self) {
        // The broker stops with the lab before its data is removed (the
        // lab's own drop then finds it down).
        let _ = self.lab.fibril(&["lab", "down"]);
        std::fs::remove_dir_all(&self.data).ok();
    }
}

impl KafkaLab {
    fn start() -> Self {
        let lib = test_support::kafka_lib().display().to_string();
        let data = std::env::temp_dir().join(test_support::unique_name("fibril-kafka"));
        let yaml = LAB
            .replace("LIB_HERE", &lib)
            .replace("DATA_HERE", &data.display().to_string());
        let lab = Lab::start(&yaml, &[]);
        let k = Self { lab, lib, data };
        let connect = format!("exec 3<>/dev/tcp/{}/9092", k.lab.ip(2));
        eventually("the broker listens", Duration::from_secs(90), || {
            k.lab.exec("default/empire-hq", &["bash", "-c", &connect]).0
        });
        k
    }

    fn bootstrap(&self) -> String {
        format!("{}:9092", self.lab.ip(2))
    }

    /// Kafka's tool `class` with `args` in `pod`: (success, stdout + stderr).
    fn java(&self, pod: &str, class: &str, args: &[&str]) -> (bool, String) {
        let cp = format!("{}/*", self.lib);
        let out = self.lab.fibril(
            &[
                &["lab", "exec", &format!("default/{pod}"), "--"],
                &[
                    "java",
                    "-Xmx192m",
                    "-XX:+UseSerialGC",
                    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                    "-cp",
                    &cp,
                    class,
                ][..],
                args,
            ]
            .concat(),
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `count` records to `topic` from `pod` (Kafka's ProducerPerformance,
    /// not idempotent: the guide's clients predate that); true when all
    /// were acknowledged.
    fn produce(&self, pod: &str, topic: &str, count: u32) -> (bool, String) {
        self.produce_with(pod, topic, count, &["acks=1", "enable.idempotence=false"])
    }

    /// The same with producer properties `props` besides the bootstrap
    /// server and timeouts.
    fn produce_with(&self, pod: &str, topic: &str, count: u32, props: &[&str]) -> (bool, String) {
        let bootstrap = format!("bootstrap.servers={}", self.bootstrap());
        let count_text = count.to_string();
        let args = [
            &[
                "--topic",
                topic,
                "--num-records",
                &count_text,
                "--record-size",
                "32",
                "--throughput",
                "-1",
                "--producer-props",
                &bootstrap,
                "max.block.ms=20000",
                "delivery.timeout.ms=20000",
                "request.timeout.ms=10000",
            ][..],
            props,
        ]
        .concat();
        let (ok, out) = self.java(pod, "org.apache.kafka.tools.ProducerPerformance", &args);
        let all_sent = out.contains(&format!("{count} records sent"))
            && !out.contains("Exception")
            && !out.contains("ERROR");
        (ok && all_sent, out)
    }

    /// Up to `count` records of `topic` from the beginning, as `pod`
    /// (Kafka's console consumer in a group of its own, classic protocol).
    fn consume(&self, pod: &str, topic: &str, count: u32) -> (bool, String) {
        let group = format!("group.id={}", test_support::unique_name("outposts"));
        self.java(
            pod,
            "org.apache.kafka.tools.consumer.ConsoleConsumer",
            &[
                "--bootstrap-server",
                &self.bootstrap(),
                "--topic",
                topic,
                "--from-beginning",
                "--max-messages",
                &count.to_string(),
                "--timeout-ms",
                "20000",
                "--command-property",
                &group,
                "--command-property",
                "group.protocol=classic",
                "--command-property",
                "default.api.timeout.ms=15000",
            ],
        )
    }

    fn kafka_flows(&self, filters: &[&str]) -> Vec<Value> {
        self.lab
            .observe_json(&[&["--all", "--protocol", "kafka"], filters].concat())
    }
}

fn import(lab: &Lab, path: &std::path::Path) {
    let out = lab.fibril(&["policy", "import", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_star_wars_kafka_policy_is_enforced_against_a_real_broker() {
    let k = KafkaLab::start();

    // Without a policy every pod produces and consumes.
    let (ok, out) = k.produce("empire-hq", "empire-announce", 5);
    assert!(ok, "no policy: the producer failed: {out}");
    let (ok, out) = k.produce("empire-hq", "deathstar-plans", 3);
    assert!(ok, "no policy: the producer failed: {out}");

    // The corpus's policy, as it is.
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/cilium-policies/examples__kubernetes-kafka__kafka-sw-security-policy.yaml");
    import(&k.lab, &corpus);

    // empire-hq produces to its two topics.
    let (ok, out) = k.produce("empire-hq", "empire-announce", 5);
    assert!(ok, "empire-hq may produce to empire-announce: {out}");
    let (ok, out) = k.produce("empire-hq", "deathstar-plans", 3);
    assert!(ok, "empire-hq may produce to deathstar-plans: {out}");

    // An outpost consumes empire-announce (ten records by now)...
    let (_, out) = k.consume("empire-outpost", "empire-announce", 10);
    assert!(
        out.contains("Processed a total of 10 messages"),
        "the outpost reads empire-announce: {out}"
    );
    // ... but neither reads the Death Star's plans nor announces.
    // (The console consumer exits 0 either way; its error says it.)
    let (_, out) = k.consume("empire-outpost", "deathstar-plans", 1);
    assert!(
        out.contains("Not authorized to access topics: [deathstar-plans]"),
        "the outpost may not read deathstar-plans: {out}"
    );
    let (ok, out) = k.produce("empire-outpost", "empire-announce", 1);
    assert!(
        !ok && out.contains("Not authorized to access topics: [empire-announce]"),
        "the outpost may not produce: {out}"
    );
    // The backup reads the plans.
    let (_, out) = k.consume("empire-backup", "deathstar-plans", 6);
    assert!(
        out.contains("Processed a total of 6 messages"),
        "the backup reads deathstar-plans: {out}"
    );

    // Every request is a flow: the outpost's refused produce...
    let outpost = k.lab.ip(4);
    let refused = k.kafka_flows(&["--from-ip", &outpost, "--verdict", "DROPPED"]);
    let produce = refused
        .iter()
        .find(|f| f["l7"]["kafka"]["api_key"] == "produce")
        .unwrap_or_else(|| panic!("a DROPPED produce flow: {refused:?}"));
    assert_eq!(
        produce["l7"]["kafka"]["topic"], "empire-announce",
        "{produce}"
    );
    assert_eq!(produce["l7"]["kafka"]["error_code"], 29, "{produce}");
    assert_eq!(produce["l7"]["type"], "REQUEST");
    assert_eq!(produce["traffic_direction"], "INGRESS");
    assert!(
        produce["destination"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l == "k8s:app=kafka"),
        "{produce}"
    );
    assert!(
        produce["ingress_denied_by"]
            .to_string()
            .contains("secure-empire-kafka"),
        "{produce}"
    );
    // ... and its fetches of empire-announce, answered without error.
    let answers = k.kafka_flows(&["--to-ip", &outpost, "--type", "l7"]);
    assert!(
        answers.iter().any(|f| f["l7"]["type"] == "RESPONSE"
            && f["l7"]["kafka"]["api_key"] == "fetch"
            && f["l7"]["kafka"]["topic"] == "empire-announce"
            && f["l7"]["kafka"].get("error_code").is_none()
            && f["verdict"] == "FORWARDED"),
        "a forwarded fetch answer: {answers:?}"
    );
    // Hubble's Kafka metrics count them by topic, key and error code.
    let m = k.lab.http_get_metrics("hubble-metrics.addr");
    assert!(
        m.lines()
            .any(|l| l.starts_with("hubble_kafka_requests_total{")
                && l.contains(r#"api_key="produce""#)
                && l.contains(r#"error_code="29""#)
                && l.contains(r#"topic="empire-announce""#)),
        "{m}"
    );
    assert!(
        m.contains("hubble_kafka_request_duration_seconds_bucket{"),
        "{m}"
    );
    let denied = k.lab.metric("fibril_proxy_kafka_requests_denied_total");
    assert!(denied >= 1, "{denied}");

    // A refused request is answered and the connection goes on: one
    // connection, a produce to a topic empire-hq may not write, then to
    // one it may.
    let (ok, out) = k.lab.exec(
        "default/empire-hq",
        &[
            "fibril-echo",
            "kafka-produce",
            &k.bootstrap(),
            "--topic",
            "rebel-plans",
            "--topic",
            "deathstar-plans",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "produce rebel-plans error_code 29",
            "produce deathstar-plans error_code 0"
        ],
        "{out}"
    );

    // Roles: Cilium's getting-started policies (`role: produce` for
    // empire-hq, `role: consume` of empire-announce for the outposts) in
    // place of the Star Wars one. Today's clients are idempotent
    // producers: `role: produce` lets them ask for a producer ID.
    let out = k
        .lab
        .fibril(&["policy", "delete", "default/secure-empire-kafka"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/cilium-policies");
    import(
        &k.lab,
        &corpus.join("examples__policies__l7__kafka__kafka-role.yaml"),
    );
    import(
        &k.lab,
        &corpus.join("examples__policies__getting-started__kafka.yaml"),
    );
    let (ok, out) = k.produce_with("empire-hq", "deathstar-plans", 4, &[]);
    assert!(ok, "an idempotent producer with role: produce: {out}");
    let (_, out) = k.consume("empire-outpost", "empire-announce", 10);
    assert!(
        out.contains("Processed a total of 10 messages"),
        "role: consume of empire-announce: {out}"
    );
    let (_, out) = k.consume("empire-outpost", "deathstar-plans", 1);
    assert!(
        out.contains("Not authorized to access topics: [deathstar-plans]"),
        "role: consume names one topic: {out}"
    );
    // The backup has no rule any more: dropped at L3/L4, never proxied.
    let (ok, out) = k.produce("empire-backup", "empire-announce", 1);
    assert!(!ok, "{out}");
    let backup = k.lab.ip(5);
    let drops = k
        .lab
        .observe_json(&["--all", "--from-ip", &backup, "--verdict", "DROPPED"]);
    assert!(
        drops.iter().any(|f| f.get("l7").is_none()),
        "the backup's connection is dropped in the kernel, before any Kafka request: {drops:?}"
    );
}
