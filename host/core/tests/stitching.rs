//! Merging stitched profiles: the rule of each type, overrides, the audiences re-evaluated once,
//! rebuilding an unstitched profile, and the id guards.

use serde_json::json;
use starling_core::engine::rebuild;
use starling_core::{Event, Model, NoCustomEnrichers, Profile, Value, apply_event, apply_merge, parse};

const CONFIG: &str = r#"
[identity]
min_length = 5
blocked = ["undefined", "guest-user"]

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "best_order"
scope = "visitor"
type = "number"
merge = "max"
[[attribute]]
name = "name"
scope = "visitor"
type = "string"
[[attribute]]
name = "first_name"
scope = "visitor"
type = "string"
merge = "earliest"
[[attribute]]
name = "categories"
scope = "visitor"
type = "set_of_strings"
[[attribute]]
name = "views"
scope = "visitor"
type = "tally"
[[attribute]]
name = "orders"
scope = "visitor"
type = "timeline"
[[attribute]]
name = "searches"
scope = "visitor"
type = "array_of_strings"
[[attribute]]
name = "checkout"
scope = "visitor"
type = "funnel"
steps = [{ name = "cart" }, { name = "pay" }]
[[attribute]]
name = "vip"
scope = "visitor"
type = "badge"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"
[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
[[enrichment]]
attribute = "best_order"
op = "max"
event = "total"
[[enrichment]]
attribute = "name"
op = "set"
event = "name"
[[enrichment]]
attribute = "first_name"
op = "set"
event = "name"
[[enrichment]]
attribute = "categories"
op = "add"
event = "category"
[[enrichment]]
attribute = "views"
op = "increment"
key = "event.category"
[[enrichment]]
attribute = "orders"
op = "capture"
fields = { total = "event.total" }
when = "event:purchase"
[[enrichment]]
attribute = "searches"
op = "append"
event = "q"
[[enrichment]]
attribute = "checkout"
op = "advance"
step = "cart"
when = "event:cart"
[[enrichment]]
attribute = "checkout"
op = "advance"
step = "pay"
when = "event:pay"
[[enrichment]]
attribute = "vip"
op = "assign"
when = "event:vip"

[[audience]]
name = "buyers"
rule = { attribute = "spend", op = ">", value = 0 }
[[audience]]
name = "big"
rule = { attribute = "spend", op = ">=", value = 100 }
[[audience]]
name = "shoes_and_hats"
rule = { all = [{ attribute = "categories", op = "contains", value = "shoes" }, { attribute = "categories", op = "contains", value = "hats" }] }

[[action]]
name = "big_joined"
audience = "big"
trigger = "joined"
connector = "webhook"
"#;

fn event(visitor: &str, name: &str, t: i64, data: serde_json::Value) -> Event {
    Event {
        id: None,
        name: name.into(),
        visitor_id: visitor.into(),
        source: None,
        timestamp_ms: t,
        data: data.as_object().cloned().unwrap_or_default(),
    }
}

fn profile(model: &Model, id: &str, events: &[Event]) -> Profile {
    let mut p = Profile::new(id);
    for e in events {
        apply_event(model, &mut p, e, &mut NoCustomEnrichers);
    }
    p
}

#[test]
fn each_type_merges_by_its_rule() {
    let model = parse(CONFIG).unwrap();
    let mut phone = profile(
        &model,
        "phone",
        &[
            event("phone", "purchase", 1_000, json!({ "total": 60, "name": "Ann", "category": "shoes", "q": "boots" })),
            event("phone", "cart", 1_500, json!({})),
            event("phone", "pay", 1_600, json!({})),
        ],
    );
    let laptop = profile(
        &model,
        "laptop",
        &[
            event("laptop", "purchase", 500, json!({ "total": 50, "name": "Annie", "category": "hats", "q": "caps" })),
            event("laptop", "view", 900, json!({ "category": "bags", "name": "Ann B." })),
            event("laptop", "vip", 950, json!({})),
        ],
    );
    assert_eq!((phone.audiences.len(), laptop.audiences.len()), (1, 1), "each a buyer, neither big");
    let out = apply_merge(&model, &mut phone, laptop, 3_000);
    let get = |n: &str| phone.get(n).map(|v| v.to_json()).unwrap_or_default();
    assert_eq!(get("spend"), json!(110.0), "numbers add");
    assert_eq!(get("best_order"), json!(60.0), "overridden: max");
    assert_eq!(get("name"), json!("Ann"), "strings keep the most recently seen profile's value");
    assert_eq!(get("first_name"), json!("Ann B."), "overridden: the earliest seen profile's value");
    assert_eq!(get("categories"), json!(["bags", "hats", "shoes"]), "sets union");
    assert_eq!(get("views")["counts"], json!({ "bags": 1.0, "hats": 1.0, "shoes": 1.0 }), "tallies add per key");
    let orders: Vec<i64> =
        get("orders").as_array().unwrap().iter().map(|e| e["data"]["total"].as_i64().unwrap()).collect();
    assert_eq!(orders, vec![50, 60], "timelines interleave by time");
    assert_eq!(get("searches"), json!(["caps", "boots"]), "arrays: the earlier profile's items first");
    assert_eq!(get("checkout")["completed"], true, "funnels keep the most advanced");
    assert!(phone.badges.contains("vip"), "badges union");
    assert_eq!((phone.first_seen_ms, phone.last_seen_ms, phone.event_count, phone.visit_count), (500, 1_600, 6, 2));
    // Audiences: `buyers` (both were in) is unchanged; `big` and `shoes_and_hats` are joined once.
    assert_eq!(out.joined(), vec!["big", "shoes_and_hats"]);
    assert!(out.left().is_empty());
    assert_eq!(out.actions.len(), 1);
    assert_eq!((out.actions[0].action.as_str(), out.actions[0].profile_id.as_str()), ("big_joined", "phone"));
}

#[test]
fn rebuilding_replays_history_without_firing_it() {
    let model = parse(CONFIG).unwrap();
    let events =
        [event("a", "purchase", 1_000, json!({ "total": 70 })), event("a", "purchase", 2_000, json!({ "total": 70 }))];
    let before = ["buyers".to_string()].into();
    let (p, out) = rebuild(&model, "a", &events, &before, &mut NoCustomEnrichers, 10_000);
    assert_eq!(p.get("spend"), Some(Value::Number(140.0)));
    assert_eq!(out.joined(), vec!["big"], "only the change against `before`");
    assert_eq!(out.actions.len(), 1);
    let (_, out) =
        rebuild(&model, "a", &events[..1], &["buyers".into(), "big".into()].into(), &mut NoCustomEnrichers, 10_000);
    assert_eq!(out.left(), vec!["big"]);
}

#[test]
fn unreliable_ids_never_stitch() {
    let model = parse(CONFIG).unwrap();
    let id = &model.identity;
    assert!(id.refuses("abc").unwrap().contains("shorter than identity.min_length (5)"));
    assert!(id.refuses("UNDEFINED").unwrap().contains("on identity.blocked"));
    assert!(id.refuses("guest-user").is_some());
    assert_eq!(id.refuses("5f4dcc3b5aa765d61d8327deb882cf99"), None);
    let defaults = parse("").unwrap().identity;
    assert!(defaults.refuses("anonymous").is_some() && defaults.refuses("null").is_some());
    assert_eq!(defaults.max_ids_per_profile, 50);
}

#[test]
fn merge_rules_are_checked_against_the_type() {
    let errors =
        parse("[[attribute]]\nname = \"n\"\nscope = \"visitor\"\ntype = \"string\"\nmerge = \"add\"\n").unwrap_err().0;
    assert_eq!(errors[0].to_string(), "5:9: merge rule `add` does not apply to string (use: latest, earliest)");
}
