use super::parse;
use crate::literal::{DurationError, parse_duration};
use crate::model::{BatchPolicy, DataSource, FieldSpec, FieldType, History, OnViolation, Retention, Trigger, When};

const GOOD: &str = r#"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[attribute]]
name = "vip"
scope = "visitor"
type = "badge"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
when = "event:purchase"

[[enrichment]]
attribute = "vip"
op = "assign"
if = { attribute = "spend", op = ">=", value = 100 }

[[audience]]
name = "big"
rule = { all = [{ attribute = "spend", op = ">", value = 50 }, { attribute = "vip", op = "is_assigned" }] }

[[action]]
name = "hook"
audience = "big"
trigger = "joined"
connector = "webhook"
params = { spend = "spend", id = "profile_id" }
"#;

#[test]
fn parses_a_complete_file() {
    let m = parse(GOOD).unwrap();
    assert_eq!(m.attributes.len(), 2);
    assert_eq!(m.enrichments[0].when, When::Event("purchase".into()));
    assert_eq!(m.audiences[0].name, "big");
    assert_eq!(m.actions[0].params.len(), 2);
    assert_eq!(m.visit_timeout_ms, 30 * 60_000);
}

#[test]
fn reports_every_error_with_its_position() {
    let bad = r#"
[[attribute]]
name = "spend"
scope = "forever"
type = "number"

[[attribute]]
name = "tier"
scope = "visitor"
type = "colour"

[[audience]]
name = "big"
rule = { attribute = "spnd", op = ">", value = 50 }

[[action]]
name = "hook"
audience = "huge"
trigger = "joined"
connector = "webhook"
"#;
    let errs = parse(bad).unwrap_err().0;
    let rendered: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        rendered,
        vec![
            "4:9: unknown scope `forever`: expected event, visit, visitor or omnichannel",
            "10:8: unknown type `colour`: expected one of string, number, boolean, date, badge, set_of_strings, array_of_strings, array_of_numbers, array_of_booleans, tally, timeline, funnel, visitor_id",
            "14:22: unknown attribute `spnd`",
            "18:12: unknown audience `huge`",
        ]
    );
}

#[test]
fn an_enricher_reads_only_declared_stored_attributes() {
    let src = format!(
        "{GOOD}\n[[attribute]]\nname = \"total\"\nscope = \"event\"\ntype = \"number\"\nfield = \"total\"\n\n[[enricher]]\nplugin = \"tier\"\nreads = [\"spend\", \"event_count\"]\n"
    );
    let m = parse(&src).unwrap();
    assert_eq!(m.enrichers[0].reads, Some(vec!["spend".to_string(), "event_count".to_string()]));
    let bad = src.replace("reads = [\"spend\", \"event_count\"]", "reads = [\"spnd\", \"total\"]");
    let rendered: Vec<String> = parse(&bad).unwrap_err().0.iter().map(|d| d.to_string()).collect();
    let line = bad.lines().position(|l| l.starts_with("reads")).unwrap() + 1;
    assert_eq!(
        rendered,
        vec![
            format!("{line}:10: enricher reads `spnd`, which is not a declared attribute"),
            format!("{line}:18: enricher reads `total`, an event attribute; it sees the event itself"),
        ]
    );
}

#[test]
fn delivery_policies() {
    let src = format!(
        "{GOOD}cooldown = \"1h\"\ndelay = \"2d\"\nbatch = {{ max_items = 50, max_age = \"5s\" }}\nconcurrency = 2\n"
    );
    let m = parse(&src).unwrap();
    let p = &m.actions[0].delivery;
    assert_eq!((p.cooldown_ms, p.delay_ms, p.concurrency), (Some(3_600_000), Some(172_800_000), 2));
    assert_eq!(p.batch, Some(BatchPolicy { max_items: 50, max_age_ms: 5_000, max_bytes: 1_000_000 }));
    let errs = parse(&format!("{GOOD}cooldown = \"soon\"\n")).unwrap_err().0;
    assert_eq!(errs[0].message, "`soon` is not a duration like 30s, 15m, 2h or 7d");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(250));
    assert_eq!(parse_duration("15m"), Ok(900_000));
    assert_eq!(parse_duration("0s"), Err(DurationError::OutOfRange("0s".into())));
    assert_eq!(parse_duration("5 parsecs"), Err(DurationError::Unreadable("5 parsecs".into())));
    assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
}

#[test]
fn syntax_errors_carry_a_position() {
    let errs = parse("[[attribute]]\nname = \"x\"\nscope = visitor\n").unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 3, "{:?}", errs[0]);
}

#[test]
fn unknown_fields_are_refused() {
    let errs = parse("[[attribute]]\nname = \"x\"\nscope = \"visit\"\ntype = \"string\"\ncolour = 1\n").unwrap_err().0;
    assert!(errs[0].message.contains("colour"), "{:?}", errs[0]);
    assert_eq!(errs[0].line, 5);
}

#[test]
fn operators_must_fit_the_type() {
    let src = "[[attribute]]\nname = \"n\"\nscope = \"visit\"\ntype = \"number\"\n[[audience]]\nname = \"a\"\nrule = { attribute = \"n\", op = \"contains\", value = \"x\" }\n";
    let errs = parse(src).unwrap_err().0;
    assert!(errs[0].message.contains("does not apply"), "{:?}", errs);
}

#[test]
fn value_types_are_checked() {
    let src = "[[attribute]]\nname = \"n\"\nscope = \"visit\"\ntype = \"number\"\n[[audience]]\nname = \"a\"\nrule = { attribute = \"n\", op = \">\", value = \"ten\" }\n";
    let errs = parse(src).unwrap_err().0;
    assert_eq!(errs[0].message, "expected a number value, found string");
}

#[test]
fn operating_sections_are_checked_with_positions() {
    let src = r#"[[attribute]]
name = "email"
scope = "visitor"
type = "visitor_id"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[source]]
name = "web"
api_key = "short"

[[event_spec]]
event = "purchase"
on_violation = "shrug"
fields = { total = "numbr", "order..id" = "string" }

[retention]
inactive_after = "forever"

[[import]]
name = "store"
event = "store_purchase"
match = "spend"
columns = { amount = "number" }

[[import]]
name = "pos"
event = "pos"
match = "email"
columns = { at = "string" }
timestamp = "at"
"#;
    let errs: Vec<String> = parse(src).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        [
            "13:11: source `web`: api_key must be at least 16 characters",
            "17:16: on_violation `shrug`: expected reject or warn",
            "18:43: fields.order..id: not a field path like `order.total`",
            "18:20: fields.total: unknown type `numbr`: expected string, number, integer, boolean, array, object, timestamp (with `?` when optional)",
            "21:18: `forever` is not a duration like 30s, 15m, 2h or 7d",
            "26:9: match: `spend` is not a visitor_id attribute",
            "34:13: timestamp: `at` must be a column of type timestamp",
        ]
    );
    let good = r#"[[attribute]]
name = "email"
scope = "visitor"
type = "visitor_id"

[[source]]
name = "web"
api_key = "0123456789abcdef"

[[event_spec]]
event = "purchase"
on_violation = "warn"
allow_other_fields = false
fields = { "order.total" = "number", coupon = "string?" }

[retention]
inactive_after = "400d"
events = "30d"
events_per_profile = 200

[[import]]
name = "pos"
event = "pos"
match = "email"
key = "mail"
columns = { at = "timestamp" }
timestamp = "at"

[[action]]
name = "forget"
trigger = "deleted"
connector = "webhook"
"#;
    let model = parse(good).unwrap();
    assert_eq!(
        model.sources,
        [DataSource {
            name: "web".into(),
            api_key: "0123456789abcdef".into(),
            claims: None,
            segment_user_id: None,
            tealium: None
        }]
    );
    let spec = model.event_spec("purchase").unwrap();
    assert_eq!((spec.on_violation, spec.allow_other_fields), (OnViolation::Warn, false));
    assert_eq!(
        spec.fields[1],
        FieldSpec { path: vec!["order".into(), "total".into()], ty: FieldType::Number, required: true }
    );
    assert!(!spec.fields[0].required);
    assert_eq!(model.retention, Some(Retention { inactive_after_ms: 400 * 86_400_000, check_every_ms: 3_600_000 }));
    assert_eq!(
        model.history,
        History { events_ms: 30 * 86_400_000, events_per_profile: 200, actions_kept_ms: 7 * 86_400_000 }
    );
    let import = model.import("pos").unwrap();
    assert_eq!((import.key.as_str(), import.timestamp.as_deref()), ("mail", Some("at")));
    assert_eq!((model.actions[0].trigger, model.actions[0].audience.as_str()), (Trigger::Deleted, ""));
}

#[test]
fn retention_values_out_of_range_are_refused_with_their_position() {
    let errors: Vec<String> = parse(
        "[retention]\nevents = \"30s\"\nevents_per_profile = 0\nactions_kept = \"forever\"\ninactive_after = \"10s\"\n",
    )
    .unwrap_err()
    .0
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(
        errors,
        [
            "5:18: retention.inactive_after must be at least 1m",
            "2:10: retention.events must be at least 1m",
            "4:16: `forever` is not a duration like 30s, 15m, 2h or 7d",
            "3:22: retention.events_per_profile must be at least 1",
        ]
    );
}

#[test]
fn tracking_formats_and_personalization_are_checked_with_positions() {
    let src = r#"
[[attribute]]
name = "user"
scope = "visitor"
type = "visitor_id"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "total"
scope = "event"
type = "number"
field = "total"
[[source]]
name = "web"
api_key = "0123456789abcdef"
segment = { user_id = "spend" }
tealium = { account = "acme", profile = "main" }

[[source]]
name = "app"
api_key = "0123456789abcdeg"
claims = []
segment = { user_id = "user" }
tealium = { account = "acme", profile = "main", datasource = "ds1" }

[personalization]
expose = ["spend", "nothing", "total"]
origins = ["https://shop.example", "shop.example", "https://shop.example/"]
requests_per_minute = 0
"#;
    let errs: Vec<String> = parse(src).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        [
            "18:23: source `web`: segment.user_id `spend` is not a visitor_id attribute",
            "25:23: source `app`: segment.user_id `user` is not among the ids the source claims",
            "26:11: source `app`: tealium account, profile and datasource are also source `web`'s",
            "29:20: personalization.expose: `nothing` is not a declared attribute",
            "29:31: personalization.expose: `total` is an event attribute, which no profile holds",
            "30:36: personalization.origins: `shop.example` is not an origin (scheme://host[:port], or \"*\")",
            "30:52: personalization.origins: `https://shop.example/` is not an origin (scheme://host[:port], or \"*\")",
            "31:23: personalization.requests_per_minute must be at least 1",
        ]
    );
    let good = src
        .replace("user_id = \"spend\"", "user_id = \"user\"")
        .replace("claims = []\n", "")
        .replace("profile = \"main\" }\n\n[[source]]", "profile = \"web\" }\n\n[[source]]")
        .replace("\"nothing\", \"total\"", "\"user\"")
        .replace(", \"shop.example\", \"https://shop.example/\"", "")
        .replace("requests_per_minute = 0", "");
    let model = parse(&good).unwrap();
    assert_eq!(model.source_by_name("app").unwrap().segment_user_id.as_deref(), Some("user"));
    let first = &model.enrichments[0];
    assert_eq!(first.attribute, "user", "userId sets the mapped id before declared enrichments");
    assert!(model.source_by_name("web").unwrap().tealium.as_ref().unwrap().admits("acme", "web", Some("any")));
    assert!(!model.source_by_name("app").unwrap().tealium.as_ref().unwrap().admits("acme", "main", Some("ds2")));
    assert_eq!(model.personalization.requests_per_minute, 600);
}

#[test]
fn without_a_personalization_table_pages_read_at_the_default_rate() {
    let model = parse("[server]\n").unwrap();
    assert_eq!(model.personalization.requests_per_minute, 600);
    assert!(model.personalization.origins.is_empty() && model.personalization.expose.is_empty());
}

#[test]
fn a_cluster_section_is_checked_with_positions() {
    let src = r#"
[cluster]
nats = ["nats://127.0.0.1:4222", "http://127.0.0.1:4223"]
node = "node a"
lease = "500ms"
replicas = 7
advertise = "http://10.0.0.1:8080/"
snapshot_every = "0s"
intake_limit = -1
placement = "halves"
wait_for_absent = "8d"
"#;
    let errs: Vec<String> = parse(src).unwrap_err().0.iter().map(ToString::to_string).collect();
    assert_eq!(
        errs,
        [
            "3:34: cluster.nats: `http://127.0.0.1:4223` is not a NATS server URL (nats://host:port)",
            "4:8: cluster.node: `node a` must be letters, digits, `-` and `_` (it names the node's keys)",
            "5:9: cluster.lease must be between 1s and 60s",
            "6:12: cluster.replicas must be between 1 and 5 (JetStream's limit)",
            "7:13: cluster.advertise: `http://10.0.0.1:8080/` is not a base URL (http://host:port, no trailing `/`)",
            "8:18: cluster.snapshot_every: `0s` must be positive and not absurdly long",
            "9:16: cluster.intake_limit must be between 0 and 10000000 events",
            "10:13: cluster.placement: `halves` is not `whole` or `spread`",
            "11:19: cluster.wait_for_absent must be between 1s and 7d",
        ]
    );
    let model = parse("[cluster]\nnats = [\"nats://a:4222\", \"nats://b:4222\"]\nnode = \"a-1\"\n").unwrap();
    let cluster = model.cluster.unwrap();
    assert_eq!((cluster.node.as_str(), cluster.lease_ms, cluster.replicas), ("a-1", 5_000, 2));
    assert_eq!((cluster.snapshot_every_ms, cluster.intake_limit, cluster.spread), (60_000, 30_000, false));
    assert_eq!(cluster.wait_for_absent_ms, 600_000);
    let spread = parse("[cluster]\nnats = [\"nats://a:4222\"]\nnode = \"a\"\nplacement = \"spread\"\n").unwrap();
    assert!(spread.cluster.unwrap().spread);
    assert!(parse("").unwrap().cluster.is_none(), "a single server needs no cluster");
}
