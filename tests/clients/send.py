"""Sends the ingestion tests' scenario to Starling with a real tracking library.

    send.py segment|rudder|tealium URL WRITE_KEY PREFIX

Two devices of one person: device A views two pages, completes an order of 60 (and the library
retries it with the same message id), and logs in; device B views a page, completes an order of
50 and logs in as the same user; a server-side call knows only the user id (an order of 5).
Every call is sent synchronously and must be answered with success.
"""

import sys

library, url, key, prefix = sys.argv[1:5]
device_a, device_b, user = f"{prefix}-device-a", f"{prefix}-device-b", f"{prefix}-user"


def failed(error, *_):
    sys.exit(f"{library}: the call failed: {error}")


def segment_like(module):
    client = module.Client(key, host=url, sync_mode=True, gzip=True, on_error=failed, max_retries=1)
    client.page(anonymous_id=device_a, name="Home", properties={"path": "/"},
                context={"userAgent": "Mozilla/5.0 (iPhone)", "campaign": {"source": "newsletter"}})
    client.page(anonymous_id=device_a, name="Shoes", properties={"path": "/shoes"})
    for _retry in range(2):
        client.track(anonymous_id=device_a, event="Order Completed", properties={"revenue": 60},
                     message_id=f"{prefix}-order-a")
    client.identify(user_id=user, anonymous_id=device_a, traits={"email": f"{prefix}@example.com"})
    client.page(anonymous_id=device_b, name="Home")
    client.track(anonymous_id=device_b, event="Order Completed", properties={"revenue": 50})
    client.identify(user_id=user, anonymous_id=device_b, traits={"plan": "pro"})
    client.track(user_id=user, event="Order Completed", properties={"revenue": 5})
    client.flush()


if library == "segment":
    import segment.analytics as segment

    segment_like(segment)
elif library == "rudder":
    import rudderstack.analytics as rudder

    segment_like(rudder)
elif library == "tealium":
    from tealium import Tealium

    Tealium.T_BASE_URL = url + "/event"
    tealium = Tealium("acme", "main", datasource=key)

    def answered(info, success, error):
        if not success:
            failed(error)

    def send(event, visitor, **data):
        tealium.trackEvent(event, data={"tealium_visitor_id": visitor, **data}, callback=answered)

    send("page_view", device_a, page_path="/")
    send("page_view", device_a, page_path="/shoes")
    send("purchase", device_a, order_total=60)
    send("login", device_a, customer_id=user, email=f"{prefix}@example.com")
    send("page_view", device_b, page_path="/")
    send("purchase", device_b, order_total=50)
    send("login", device_b, customer_id=user, plan="pro")
    send("purchase", user, order_total=5, customer_id=user)
else:
    sys.exit(f"unknown library {library}")
print(f"{library}: sent")
