//! The segmentation model end to end in memory: every attribute type and operation, every
//! enrichment trigger, condition operator and action trigger, and the passing of time.

use serde_json::json;
use starling_core::engine::{explain, next_wakeup};
use starling_core::model::Trigger;
use starling_core::value::MAX_STRING_CHARS;
use starling_core::{Event, Model, NoCustomEnrichers, Outcome, Profile, Value, apply_event, apply_time, parse};

const MINUTE: i64 = 60_000;
const DAY: i64 = 24 * 60 * MINUTE;
const T0: i64 = 1_700_000_000_000;

fn event(name: &str, t: i64, data: serde_json::Value) -> Event {
    Event {
        id: None,
        name: name.into(),
        visitor_id: "v1".into(),
        source: None,
        timestamp_ms: t,
        data: data.as_object().cloned().unwrap_or_default(),
    }
}

struct Visitor {
    model: Model,
    profile: Profile,
}

impl Visitor {
    fn new(config: &str) -> Self {
        let model = parse(config).unwrap_or_else(|e| panic!("{}", e.render("test.toml")));
        Visitor { model, profile: Profile::new("v1") }
    }
    fn send(&mut self, name: &str, t: i64, data: serde_json::Value) -> Outcome {
        apply_event(&self.model, &mut self.profile, &event(name, t, data), &mut NoCustomEnrichers)
    }
    fn tick(&mut self, now: i64) -> Outcome {
        apply_time(&self.model, &mut self.profile, now, &mut NoCustomEnrichers)
    }
    fn get(&self, name: &str) -> Option<Value> {
        self.profile.get(name)
    }
    fn json(&self, name: &str) -> serde_json::Value {
        self.get(name).map_or(serde_json::Value::Null, |v| v.to_json())
    }
}

fn attr(name: &str, scope: &str, ty: &str) -> String {
    format!("[[attribute]]\nname = \"{name}\"\nscope = \"{scope}\"\ntype = \"{ty}\"\n")
}

fn errors(config: &str) -> Vec<String> {
    parse(config).map(|_| Vec::new()).unwrap_or_else(|e| e.0.iter().map(|d| d.to_string()).collect())
}

#[test]
fn number_operations() {
    let config = [
        attr("spend", "visitor", "number"),
        attr("credits", "visitor", "number"),
        attr("smallest", "visitor", "number"),
        attr("largest", "visitor", "number"),
        attr("last3_sum", "visitor", "number"),
        attr("last3_avg", "visitor", "number"),
        attr("latest", "visitor", "number"),
        r#"
[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
[[enrichment]]
attribute = "credits"
op = "decrement"
value = 2
[[enrichment]]
attribute = "smallest"
op = "min"
event = "total"
[[enrichment]]
attribute = "largest"
op = "max"
event = "total"
[[enrichment]]
attribute = "last3_sum"
op = "rolling_sum"
event = "total"
window = 3
[[enrichment]]
attribute = "last3_avg"
op = "rolling_avg"
event = "total"
window = 3
[[enrichment]]
attribute = "latest"
op = "set"
event = "total"
[[enrichment]]
attribute = "latest"
op = "clear"
when = "event:forget"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    for (i, total) in [10, 40, 5, 30].into_iter().enumerate() {
        v.send("purchase", T0 + i as i64, json!({ "total": total }));
    }
    assert_eq!(v.json("spend"), json!(85.0));
    assert_eq!(v.json("credits"), json!(-8.0));
    assert_eq!(v.json("smallest"), json!(5.0));
    assert_eq!(v.json("largest"), json!(40.0));
    assert_eq!(v.json("last3_sum"), json!(75.0));
    assert_eq!(v.json("last3_avg"), json!(25.0));
    assert_eq!(v.json("latest"), json!(30.0));
    v.send("forget", T0 + 10, json!({}));
    assert_eq!(v.get("latest"), None);
}

#[test]
fn string_and_visitor_id_operations() {
    let config = [
        attr("first_source", "visitor", "string"),
        attr("last_source", "visitor", "string"),
        attr("usual_source", "visitor", "string"),
        attr("email", "visitor", "string"),
        attr("code", "visitor", "string"),
        attr("crm_id", "visitor", "visitor_id"),
        r#"
[[enrichment]]
attribute = "first_source"
op = "capture_first"
event = "source"
[[enrichment]]
attribute = "last_source"
op = "capture_last"
event = "source"
[[enrichment]]
attribute = "usual_source"
op = "capture_most_frequent"
event = "source"
[[enrichment]]
attribute = "email"
op = "lowercase"
event = "email"
[[enrichment]]
attribute = "code"
op = "uppercase"
event = "code"
[[enrichment]]
attribute = "crm_id"
op = "set"
event = "crm"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    for (i, source) in ["ads", "mail", "mail", "social"].into_iter().enumerate() {
        v.send("view", T0 + i as i64, json!({ "source": source }));
    }
    v.send("login", T0 + 10, json!({ "email": "Ann@Example.COM", "code": "ab1", "crm": 4711 }));
    assert_eq!(v.json("first_source"), json!("ads"));
    assert_eq!(v.json("last_source"), json!("social"));
    assert_eq!(v.json("usual_source"), json!("mail"));
    assert_eq!(v.json("email"), json!("ann@example.com"));
    assert_eq!(v.json("code"), json!("AB1"));
    assert_eq!(v.json("crm_id"), json!("4711"));
    v.send("view", T0 + 11, json!({ "source": "x".repeat(MAX_STRING_CHARS + 50) }));
    let Some(Value::String(s)) = v.get("last_source") else { panic!() };
    assert_eq!(s.chars().count(), MAX_STRING_CHARS, "long strings are truncated as documented");
}

#[test]
fn boolean_date_and_badge_operations() {
    let config = [
        attr("subscribed", "visitor", "boolean"),
        attr("dark_mode", "visitor", "boolean"),
        attr("last_order", "visitor", "date"),
        attr("birthday", "visitor", "date"),
        attr("vip", "visitor", "badge"),
        r#"
[[enrichment]]
attribute = "subscribed"
op = "set"
event = "subscribed"
[[enrichment]]
attribute = "dark_mode"
op = "toggle"
when = "event:toggle"
[[enrichment]]
attribute = "last_order"
op = "set"
value = "now"
when = "event:purchase"
[[enrichment]]
attribute = "birthday"
op = "set"
event = "birthday"
[[enrichment]]
attribute = "vip"
op = "assign"
when = "event:purchase"
[[enrichment]]
attribute = "vip"
op = "remove"
when = "event:refund"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    v.send("toggle", T0, json!({ "subscribed": true, "birthday": "1990-04-01T00:00:00Z" }));
    v.send("purchase", T0 + 5, json!({}));
    assert_eq!(v.json("subscribed"), json!(true));
    assert_eq!(v.json("dark_mode"), json!(true));
    assert_eq!(v.get("last_order"), Some(Value::Date(T0 + 5)));
    assert_eq!(v.json("birthday"), json!("1990-04-01T00:00:00.000Z"));
    assert!(v.profile.badges.contains("vip"));
    v.send("toggle", T0 + 6, json!({}));
    v.send("refund", T0 + 7, json!({}));
    assert_eq!(v.json("dark_mode"), json!(false));
    assert!(!v.profile.badges.contains("vip"));
}

#[test]
fn set_operations_and_limits() {
    let config = [
        attr("seen", "visitor", "set_of_strings"),
        attr("bought", "visitor", "set_of_strings"),
        attr("not_bought", "visitor", "set_of_strings"),
        attr("interests", "visitor", "set_of_strings"),
        attr("all", "visitor", "set_of_strings"),
        attr("category_views", "visitor", "tally"),
        r#"
[[enrichment]]
attribute = "seen"
op = "add"
event = "sku"
when = "event:view"
[[enrichment]]
attribute = "bought"
op = "add"
event = "skus"
when = "event:purchase"
[[enrichment]]
attribute = "seen"
op = "remove"
event = "sku"
when = "event:hide"
[[enrichment]]
attribute = "not_bought"
op = "union"
from = "seen"
[[enrichment]]
attribute = "not_bought"
op = "difference"
from = "bought"
[[enrichment]]
attribute = "category_views"
op = "increment"
key = "event.category"
when = "event:view"
[[enrichment]]
attribute = "interests"
op = "top_keys"
from = "category_views"
n = 2
[[enrichment]]
attribute = "all"
op = "add"
event = "many"
when = "event:bulk"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    for (i, (sku, cat)) in [("a", "shoes"), ("b", "hats"), ("c", "shoes"), ("d", "bags"), ("d", "bags"), ("e", "bags")]
        .into_iter()
        .enumerate()
    {
        v.send("view", T0 + i as i64, json!({ "sku": sku, "category": cat }));
    }
    v.send("purchase", T0 + 10, json!({ "skus": ["a", "c"] }));
    v.send("hide", T0 + 11, json!({ "sku": "e" }));
    assert_eq!(v.json("seen"), json!(["a", "b", "c", "d"]));
    assert_eq!(v.json("bought"), json!(["a", "c"]));
    assert_eq!(v.json("not_bought"), json!(["b", "d", "e"]), "union accumulates; difference removes the bought");
    assert_eq!(v.json("interests"), json!(["bags", "shoes"]));
    let many: Vec<String> = (0..30_005).map(|i| format!("m{i}")).collect();
    let o = v.send("bulk", T0 + 12, json!({ "many": many }));
    assert_eq!(v.get("all").and_then(|s| s.size()), Some(30_000));
    assert!(o.warnings.iter().any(|w| w.contains("set is full (30000 members)")), "{:?}", o.warnings);
}

#[test]
fn arrays_append_and_drop_their_oldest_items() {
    let config = [
        attr("recent_searches", "visitor", "array_of_strings"),
        attr("cart_values", "visitor", "array_of_numbers"),
        attr("answers", "visitor", "array_of_booleans"),
        "max_entries = 3\n".into(),
        r#"
[[enrichment]]
attribute = "recent_searches"
op = "append"
event = "q"
[[enrichment]]
attribute = "cart_values"
op = "append"
event = "value"
[[enrichment]]
attribute = "answers"
op = "append"
event = "yes"
[[enrichment]]
attribute = "cart_values"
op = "set"
value = [1, 2]
when = "event:reset"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    for (i, (q, value, yes)) in
        [("a", 1, true), ("b", 2, false), ("a", 3, true), ("c", 4, true)].into_iter().enumerate()
    {
        v.send("x", T0 + i as i64, json!({ "q": q, "value": value, "yes": yes }));
    }
    assert_eq!(v.json("recent_searches"), json!(["a", "b", "a", "c"]), "arrays keep duplicates and order");
    assert_eq!(v.json("cart_values"), json!([1.0, 2.0, 3.0, 4.0]));
    assert_eq!(v.json("answers"), json!([false, true, true]), "max_entries = 3 drops the oldest");
    v.send("reset", T0 + 9, json!({}));
    assert_eq!(v.json("cart_values"), json!([1.0, 2.0]));
}

#[test]
fn tally_operations_and_conditions() {
    let config = [
        attr("categories", "visitor", "tally"),
        attr("shoe_fan", "visitor", "badge"),
        r#"
[[enrichment]]
attribute = "categories"
op = "increment"
key = "event.category"
event = "quantity"
[[enrichment]]
attribute = "categories"
op = "set_key"
key = "gift"
value = 1
when = "event:gift"
[[enrichment]]
attribute = "categories"
op = "remove_key"
key = "event.category"
when = "event:forget"
[[enrichment]]
attribute = "shoe_fan"
op = "assign"
if = { attribute = "categories.favorite", op = "=", value = "shoes" }

[[audience]]
name = "shoe_buyers"
rule = { attribute = "categories", key = "shoes", op = ">=", value = 3 }
[[audience]]
name = "has_hats"
rule = { attribute = "categories", op = "has_key", value = "hats" }
[[audience]]
name = "busy"
rule = { attribute = "categories.total", op = ">", value = 5 }
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    let o = v.send("view", T0, json!({ "category": "hats", "quantity": 1 }));
    assert_eq!(o.joined(), vec!["has_hats"]);
    let o = v.send("view", T0 + 1, json!({ "category": "shoes", "quantity": 2 }));
    assert!(o.joined().is_empty());
    let o = v.send("view", T0 + 2, json!({ "category": "shoes", "quantity": 1 }));
    assert_eq!(o.joined(), vec!["shoe_buyers"]);
    assert!(v.profile.badges.contains("shoe_fan"));
    v.send("gift", T0 + 3, json!({}));
    let o = v.send("forget", T0 + 4, json!({ "category": "hats" }));
    assert_eq!(o.left(), vec!["has_hats"]);
    assert_eq!(v.json("categories"), json!({ "counts": { "gift": 1.0, "shoes": 3.0 }, "favorite": "shoes" }));
}

#[test]
fn timelines_capture_cap_and_expire() {
    let config = [
        attr("orders", "visitor", "timeline"),
        "max_entries = 3\nmax_age = \"30d\"\n".into(),
        r#"
[[enrichment]]
attribute = "orders"
op = "capture"
fields = { total = "event.total", sku = "event.sku" }
when = "event:purchase"

[[audience]]
name = "recent_buyers"
rule = { attribute = "orders", op = "within_last", value = "2d" }
[[audience]]
name = "regulars"
rule = { attribute = "orders.size", op = ">=", value = 2 }
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    for (i, total) in [10, 20, 30, 40].into_iter().enumerate() {
        v.send("purchase", T0 + i as i64 * DAY, json!({ "total": total, "sku": format!("s{i}") }));
    }
    let entries = v.json("orders");
    assert_eq!(entries.as_array().unwrap().len(), 3, "max_entries");
    assert_eq!(entries[0]["data"], json!({ "total": 20, "sku": "s1" }));
    assert!(v.profile.audiences.contains("recent_buyers") && v.profile.audiences.contains("regulars"));
    // No event for 40 days: entries expire and both audiences are left on the timer.
    let o = v.tick(T0 + 43 * DAY);
    assert_eq!(v.json("orders"), json!([]));
    let mut left = o.left();
    left.sort();
    assert_eq!(left, vec!["recent_buyers", "regulars"]);
}

#[test]
fn funnels_advance_in_order_and_complete() {
    let config = [
        attr("checkout", "visitor", "funnel"),
        r#"steps = [{ name = "cart" }, { name = "coupon", required = false }, { name = "payment" }, { name = "confirm" }]
[[enrichment]]
attribute = "checkout"
op = "advance"
step = "cart"
when = "event:add_to_cart"
fields = { sku = "event.sku" }
[[enrichment]]
attribute = "checkout"
op = "advance"
step = "payment"
when = "event:pay"
[[enrichment]]
attribute = "checkout"
op = "advance"
step = "confirm"
when = "event:confirm"
[[enrichment]]
attribute = "checkout"
op = "reset"
when = "event:abandon"

[[audience]]
name = "converted"
rule = { attribute = "checkout.completed", op = "=", value = true }
[[audience]]
name = "stuck_at_payment"
rule = { attribute = "checkout.step", op = "=", value = "payment" }
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    let o = v.send("confirm", T0, json!({}));
    assert!(v.get("checkout").is_none() || v.json("checkout")["steps"] == json!([]));
    assert!(o.warnings[0].contains("before required step `cart`"), "{:?}", o.warnings);
    v.send("add_to_cart", T0 + 1, json!({ "sku": "s9" }));
    let o = v.send("pay", T0 + 2, json!({}));
    assert_eq!(o.joined(), vec!["stuck_at_payment"], "the optional coupon step may be skipped");
    let o = v.send("confirm", T0 + 3, json!({}));
    assert_eq!((o.joined(), o.left()), (vec!["converted"], vec!["stuck_at_payment"]));
    let f = v.json("checkout");
    assert_eq!(f["completed"], true);
    assert_eq!(f["steps"][0]["data"], json!({ "sku": "s9" }));
    let o = v.send("abandon", T0 + 4, json!({}));
    assert_eq!(o.left(), vec!["converted"]);
}

#[test]
fn event_attributes_are_read_from_each_event() {
    let config = [
        attr("order_total", "event", "number"),
        "field = \"order.total\"\n".into(),
        attr("big_orders", "visitor", "number"),
        attr("spend", "visitor", "number"),
        r#"
[[enrichment]]
attribute = "big_orders"
op = "increment"
if = { attribute = "order_total", op = ">", value = 100 }
[[enrichment]]
attribute = "spend"
op = "increment"
from = "order_total"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    v.send("purchase", T0, json!({ "order": { "total": "150" } }));
    v.send("purchase", T0 + 1, json!({ "order": { "total": 20 } }));
    assert_eq!(v.json("big_orders"), json!(1.0));
    assert_eq!(v.json("spend"), json!(170.0));
    assert_eq!(v.get("order_total"), None, "event attributes are not stored");
}

#[test]
fn enrichment_triggers() {
    let config = [
        attr("visitors", "visitor", "number"),
        attr("visits", "visitor", "number"),
        attr("ended", "visitor", "number"),
        attr("purchases", "visitor", "number"),
        attr("all_events", "visitor", "number"),
        attr("pages_this_visit", "visit", "number"),
        attr("last_visit_pages", "visitor", "number"),
        r#"
[[enrichment]]
attribute = "visitors"
op = "increment"
when = "new_visitor"
[[enrichment]]
attribute = "visits"
op = "increment"
when = "new_visit"
[[enrichment]]
attribute = "ended"
op = "increment"
when = "visit_ended"
[[enrichment]]
attribute = "last_visit_pages"
op = "set"
from = "pages_this_visit"
when = "visit_ended"
[[enrichment]]
attribute = "purchases"
op = "increment"
when = "event:purchase"
[[enrichment]]
attribute = "all_events"
op = "increment"
when = "any"
[[enrichment]]
attribute = "pages_this_visit"
op = "increment"
when = "event:view"
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    v.send("view", T0, json!({}));
    v.send("view", T0 + MINUTE, json!({}));
    v.send("purchase", T0 + 2 * MINUTE, json!({}));
    // The visit ends from the timer, without a new event.
    let due = v.profile.wakeup_ms.expect("a visit-end wake-up is scheduled");
    assert_eq!(due, T0 + 2 * MINUTE + 30 * MINUTE + 1);
    assert!(!v.tick(due - 1).visit_ended);
    assert!(v.tick(due).visit_ended);
    assert_eq!(v.json("ended"), json!(1.0));
    assert_eq!(v.json("last_visit_pages"), json!(2.0));
    // A later tick does not end it again; the next event starts a new visit.
    assert!(!v.tick(due + DAY).visit_ended);
    let o = v.send("view", T0 + DAY, json!({}));
    assert!(o.new_visit && !o.visit_ended);
    // A visit that times out with no timer run ends when the next event arrives.
    let o = v.send("view", T0 + 2 * DAY, json!({}));
    assert!(o.visit_ended && o.new_visit);
    assert_eq!(
        [v.json("visitors"), v.json("visits"), v.json("ended"), v.json("purchases"), v.json("all_events")],
        [json!(1.0), json!(3.0), json!(2.0), json!(1.0), json!(5.0)]
    );
    assert_eq!(v.json("pages_this_visit"), json!(1.0));
    assert_eq!(v.profile.visit_count, 3);
}

const ACTIONS: &str = r#"
[[attribute]]
name = "spend"
scope = "visitor"
type = "number"
[[attribute]]
name = "last_purchase"
scope = "visitor"
type = "date"
[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"
[[enrichment]]
attribute = "last_purchase"
op = "set"
value = "now"
when = "event:purchase"

[[audience]]
name = "spenders"
rule = { attribute = "spend", op = ">=", value = 100 }
[[audience]]
name = "recent"
rule = { attribute = "last_purchase", op = "within_last", value = "7d" }

[[action]]
name = "on_join"
audience = "spenders"
trigger = "joined"
connector = "webhook"
[[action]]
name = "on_leave"
audience = "recent"
trigger = "left"
connector = "webhook"
params = { spend = "spend" }
[[action]]
name = "at_start"
audience = "spenders"
trigger = "visit_started"
connector = "webhook"
[[action]]
name = "at_end"
audience = "spenders"
trigger = "visit_ended"
connector = "webhook"
[[action]]
name = "big_orders"
trigger = "event"
event = "purchase"
if = { attribute = "event.total", op = ">", value = 50 }
connector = "webhook"
params = { total = "event.total" }
"#;

fn fired(o: &Outcome) -> Vec<(&str, Trigger)> {
    o.actions.iter().map(|a| (a.action.as_str(), a.trigger)).collect()
}

#[test]
fn action_triggers() {
    let mut v = Visitor::new(ACTIONS);
    let o = v.send("purchase", T0, json!({ "total": 40 }));
    assert_eq!(fired(&o), vec![]);
    let o = v.send("purchase", T0 + MINUTE, json!({ "total": 70 }));
    assert_eq!(fired(&o), vec![("on_join", Trigger::Joined), ("big_orders", Trigger::Event)]);
    assert_eq!(o.actions[1].params, vec![("total".to_string(), Value::Number(70.0))]);
    let o = v.send("view", T0 + 2 * MINUTE, json!({}));
    assert_eq!(fired(&o), vec![], "no action without a change");
    // The visit ends on the timer: visit_ended for the audience the visitor is in.
    let o = v.tick(T0 + 40 * MINUTE);
    assert_eq!(fired(&o), vec![("at_end", Trigger::VisitEnded)]);
    assert_eq!(o.actions[0].occurred_at_ms, T0 + 32 * MINUTE, "a visit ends when its timeout runs out");
    // A new visit: visit_started for the audience the visitor is in.
    let o = v.send("view", T0 + DAY, json!({}));
    assert_eq!(fired(&o), vec![("at_start", Trigger::VisitStarted)]);
    // Seven days after the purchase the visitor leaves `recent` on the timer.
    assert_eq!(v.profile.wakeup_ms, Some(T0 + DAY + 30 * MINUTE + 1), "first the visit ends");
    v.tick(T0 + DAY + 40 * MINUTE);
    let wake = next_wakeup(&v.model, &v.profile, T0 + DAY + 40 * MINUTE).unwrap();
    assert_eq!(wake, T0 + MINUTE + 7 * DAY + 1);
    assert_eq!(v.profile.wakeup_ms, Some(wake));
    let o = v.tick(wake);
    assert_eq!(o.left(), vec!["recent"]);
    assert_eq!(fired(&o), vec![("on_leave", Trigger::Left)]);
    assert_eq!(o.actions[0].params, vec![("spend".to_string(), Value::Number(110.0))]);
    assert_eq!(v.profile.wakeup_ms, None, "nothing left to wait for");
}

#[test]
fn only_audiences_reading_changed_attributes_are_evaluated() {
    let config = [
        attr("score", "visitor", "number"),
        attr("other", "visitor", "number"),
        r#"
[[enrichment]]
attribute = "score"
op = "increment"
when = "event:score"
[[enrichment]]
attribute = "other"
op = "increment"
when = "event:other"
[[audience]]
name = "high"
rule = { attribute = "score", op = ">", value = 5 }
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    v.send("other", T0, json!({}));
    // A change the engine did not make (as a stale profile would have) is not seen...
    v.profile.attributes.insert("score".into(), Value::Number(10.0));
    let o = v.send("other", T0 + 1, json!({}));
    assert!(o.joined().is_empty(), "`high` does not read `other`, so it is not evaluated");
    // ...until an input of the audience changes.
    let o = v.send("score", T0 + 2, json!({}));
    assert_eq!(o.joined(), vec!["high"]);
}

#[test]
fn explain_shows_each_leaf() {
    let mut v = Visitor::new(ACTIONS);
    v.send("purchase", T0, json!({ "total": 40 }));
    let e = explain(&v.model, &v.profile, "spenders", T0).unwrap();
    assert_eq!(e["member"], false);
    assert_eq!(e["reads"], json!(["spend"]));
    assert_eq!(
        e["rule"],
        json!({ "attribute": "spend", "op": ">=", "value": 100.0, "ignore_case": false, "actual": 40.0, "result": false })
    );
    assert!(explain(&v.model, &v.profile, "nobody", T0).is_none());
}

#[test]
fn string_conditions() {
    let config = [
        attr("email", "visitor", "string"),
        r#"
[[enrichment]]
attribute = "email"
op = "set"
event = "email"
[[audience]]
name = "staff"
rule = { attribute = "email", op = "regex", value = '@example\.com$', ignore_case = true }
[[audience]]
name = "not_test"
rule = { all = [{ attribute = "email", op = "is_assigned" }, { not = { attribute = "email", op = "starts_with", value = "test" } }] }
[[audience]]
name = "either"
rule = { any = [{ attribute = "email", op = "ends_with", value = ".org" }, { attribute = "email", op = "contains", value = "vip" }] }
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    let o = v.send("login", T0, json!({ "email": "Ann@EXAMPLE.com" }));
    assert_eq!(o.joined(), vec!["staff", "not_test"]);
    let o = v.send("login", T0 + 1, json!({ "email": "test-vip@x.org" }));
    assert_eq!((o.joined(), o.left()), (vec!["either"], vec!["staff", "not_test"]));
}

#[test]
fn number_and_date_conditions() {
    let config = [
        attr("age", "visitor", "number"),
        attr("signup", "visitor", "date"),
        r#"
[[enrichment]]
attribute = "age"
op = "set"
event = "age"
[[enrichment]]
attribute = "signup"
op = "set"
event = "signup"
[[audience]]
name = "adults"
rule = { attribute = "age", op = "between", value = [18, 64] }
[[audience]]
name = "early"
rule = { attribute = "signup", op = "before", value = 2020-01-01T00:00:00Z }
[[audience]]
name = "late"
rule = { attribute = "signup", op = "after", value = "2020-01-01T00:00:00Z" }
[[audience]]
name = "lapsed"
rule = { attribute = "signup", op = "not_within_last", value = "365d" }
"#
        .into(),
    ]
    .concat();
    let mut v = Visitor::new(&config);
    let o = v.send("x", T0, json!({ "age": 30, "signup": "2019-06-01T00:00:00Z" }));
    assert_eq!(o.joined(), vec!["adults", "early", "lapsed"]);
    let o = v.send("x", T0 + 1, json!({ "age": 70, "signup": T0 - DAY }));
    assert_eq!((o.joined(), o.left()), (vec!["late"], vec!["adults", "early", "lapsed"]));
}

#[test]
fn configuration_errors_name_the_problem_and_position() {
    let base = attr("n", "visitor", "number")
        + &attr("s", "visitor", "string")
        + &attr("f", "visitor", "funnel")
        + "steps = [{ name = \"a\" }]\n";
    let cases = [
        (
            "[[audience]]\nname = \"x\"\nrule = { attribute = \"s\", op = \"regex\", value = \"(\" }\n",
            "invalid regular expression",
        ),
        (
            "[[audience]]\nname = \"x\"\nrule = { attribute = \"n\", op = \"between\", value = 3 }\n",
            "`between` needs `value = [low, high]`",
        ),
        (
            "[[audience]]\nname = \"x\"\nrule = { attribute = \"n\", op = \"within_last\", value = \"3d\" }\n",
            "operator `within_last` does not apply to number `n`",
        ),
        (
            "[[audience]]\nname = \"x\"\nrule = { attribute = \"s.favorite\", op = \"=\", value = \"a\" }\n",
            "string attribute `s` has no `favorite`",
        ),
        (
            "[[audience]]\nname = \"x\"\nrule = { attribute = \"event.total\", op = \">\", value = 1 }\n",
            "audiences read profile attributes only",
        ),
        (
            "[[enrichment]]\nattribute = \"f\"\nop = \"advance\"\nstep = \"b\"\n",
            "funnel `f` has no step `b` (steps: a)",
        ),
        ("[[enrichment]]\nattribute = \"n\"\nop = \"rolling_avg\"\nevent = \"x\"\n", "`rolling_avg` needs `window`"),
        (
            "[[enrichment]]\nattribute = \"s\"\nop = \"append\"\nevent = \"x\"\n",
            "operation `append` does not apply to string attribute `s`",
        ),
        (
            "[[enrichment]]\nattribute = \"n\"\nop = \"increment\"\nstep = \"x\"\n",
            "`step` does not apply to operation `increment`",
        ),
        (
            "[[action]]\nname = \"a\"\ntrigger = \"event\"\naudience = \"x\"\nconnector = \"c\"\n",
            "an event feed (trigger = \"event\") has no audience",
        ),
        (
            "[[action]]\nname = \"a\"\ntrigger = \"sometimes\"\naudience = \"x\"\nconnector = \"c\"\n",
            "unknown trigger `sometimes`",
        ),
    ];
    let base_lines = base.lines().count();
    for (extra, message) in cases {
        let errs = errors(&format!("{base}{extra}"));
        assert!(!errs.is_empty(), "{extra}: no error");
        assert!(errs[0].contains(message), "{extra}: {errs:?}");
        let line: usize = errs[0].split(':').next().unwrap().parse().unwrap();
        assert!(line > base_lines, "the error points into the added lines: {errs:?}");
    }
}

#[test]
fn each_data_source_has_its_own_visit_timeout() {
    let config = "[visits]\ntimeout_minutes = 30\ntimeout_minutes_by_source = { app = 120 }\n";
    let mut v = Visitor::new(config);
    let from =
        |source: Option<&str>, t: i64| Event { source: source.map(str::to_string), ..event("view", t, json!({})) };
    let send = |e: Event, v: &mut Visitor| apply_event(&v.model, &mut v.profile, &e, &mut NoCustomEnrichers);
    send(from(Some("app"), T0), &mut v);
    assert_eq!(v.profile.wakeup_ms, Some(T0 + 120 * MINUTE + 1));
    let o = send(from(Some("app"), T0 + 90 * MINUTE), &mut v);
    assert!(!o.new_visit, "90 minutes is within the app's timeout");
    let o = send(from(None, T0 + 100 * MINUTE), &mut v);
    assert!(!o.new_visit);
    let o = send(from(None, T0 + 140 * MINUTE), &mut v);
    assert!(o.new_visit && o.visit_ended, "web events fall back to the default 30 minutes");
    assert_eq!(
        errors("[visits]\ntimeout_minutes_by_source = { app = 5000 }\n"),
        vec!["2:37: visits.timeout_minutes_by_source.app must be between 1 and 1440"]
    );
}
