// {{name}}: a Starling connector in C. POSTs each action's parameters as a JSON object to its
// `url` setting over wasi:http, with the bearer token from the secret `token` when configured.
//
// `connector.h` is generated from the WIT world by `starling plugin build`. The arguments of an
// exported function belong to it (freed here); what it returns is freed by the generated code.
// No stdio (printf and friends would import WASI's filesystem interfaces, which a connector is
// not granted): numbers are formatted by hand.

#include "connector.h"

#include <stdlib.h>
#include <string.h>

typedef exports_starling_plugin_deliver_result_void_delivery_error_t result_t;

// A growable byte buffer.
typedef struct {
    char *ptr;
    size_t len, cap;
} buf_t;

static void put(buf_t *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        b->ptr = realloc(b->ptr, b->cap);
    }
    memcpy(b->ptr + b->len, s, n);
    b->len += n;
    b->ptr[b->len] = '\0';
}

static void puts_(buf_t *b, const char *s) { put(b, s, strlen(s)); }

static void put_json_string(buf_t *b, const uint8_t *s, size_t n) {
    puts_(b, "\"");
    for (size_t i = 0; i < n; i++) {
        char esc[8];
        if (s[i] == '"' || s[i] == '\\') {
            esc[0] = '\\', esc[1] = (char)s[i];
            put(b, esc, 2);
        } else if (s[i] < 0x20) {
            const char *hex = "0123456789abcdef";
            char u[6] = {'\\', 'u', '0', '0', hex[s[i] >> 4], hex[s[i] & 15]};
            put(b, u, 6);
        } else {
            put(b, (const char *)&s[i], 1);
        }
    }
    puts_(b, "\"");
}

static void put_integer(buf_t *b, long long n) {
    char digits[24];
    int at = sizeof digits;
    unsigned long long u = n < 0 ? -(unsigned long long)n : (unsigned long long)n;
    do {
        digits[--at] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (n < 0) digits[--at] = '-';
    put(b, digits + at, sizeof digits - at);
}

// Integers exactly; other numbers with up to six decimals.
static void put_number(buf_t *b, double n) {
    if (n != n || n > 9e15 || n < -9e15) {
        puts_(b, "null");
        return;
    }
    long long whole = (long long)n;
    long long millionths = (long long)((n - (double)whole) * 1e6 + (n < 0 ? -0.5 : 0.5));
    if (millionths == 0 || millionths == 1000000 || millionths == -1000000) {
        put_integer(b, whole + millionths / 1000000);
        return;
    }
    if (n < 0 && whole == 0) puts_(b, "-");
    put_integer(b, whole);
    char frac[7];
    long long f = millionths < 0 ? -millionths : millionths;
    for (int i = 5; i >= 0; i--, f /= 10) frac[i] = (char)('0' + f % 10);
    int len = 6;
    while (len > 0 && frac[len - 1] == '0') len--;
    puts_(b, ".");
    put(b, frac, len);
}

static void put_value(buf_t *b, const starling_plugin_types_attribute_value_t *v) {
    switch (v->tag) {
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_TEXT:
        put_json_string(b, v->val.text.ptr, v->val.text.len);
        break;
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_NUMBER:
        put_number(b, v->val.number);
        break;
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_BOOLEAN:
        puts_(b, v->val.boolean ? "true" : "false");
        break;
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_DATE:
        put_number(b, (double)v->val.date);
        break;
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_STRING_SET:
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_STRING_ARRAY: {
        const connector_list_string_t *items = &v->val.string_set;
        puts_(b, "[");
        for (size_t i = 0; i < items->len; i++) {
            if (i) puts_(b, ",");
            put_json_string(b, items->ptr[i].ptr, items->ptr[i].len);
        }
        puts_(b, "]");
        break;
    }
    case STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_JSON:
        put(b, (const char *)v->val.json.ptr, v->val.json.len);
        break;
    default:  // number and boolean arrays, tallies, timelines: not sent by this template
        puts_(b, "null");
    }
}

static bool setting(const starling_plugin_types_action_t *a, const char *key, connector_string_t *out) {
    size_t n = strlen(key);
    for (size_t i = 0; i < a->settings.len; i++) {
        if (a->settings.ptr[i].f0.len == n && memcmp(a->settings.ptr[i].f0.ptr, key, n) == 0) {
            *out = a->settings.ptr[i].f1;
            return true;
        }
    }
    return false;
}

static result_t failure(uint8_t tag, const char *message) {
    result_t r = {.is_err = true};
    r.val.err.tag = tag;
    connector_string_dup(&r.val.err.val.permanent, message);  // retryable and permanent share a layout
    return r;
}

static void header(wasi_http_types_own_fields_t fields, const char *name, const char *value, size_t len) {
    connector_string_t key;
    connector_string_set(&key, name);
    wasi_http_types_field_value_t val = {(uint8_t *)value, len};
    wasi_http_types_header_error_t err;
    wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(fields), &key, &val, &err);
}

// Sends `body` to `url`; the HTTP status, or 0 when the request failed (`why` says why).
static int post(const connector_string_t *url, const char *token, const char *key, size_t key_len, buf_t *body,
                const char **why) {
    // scheme://authority/path?query
    const char *s = (const char *)url->ptr, *end = s + url->len;
    const char *sep = strstr(s, "://");
    if (!sep || sep >= end) {
        *why = "the url has no scheme";
        return 0;
    }
    wasi_http_types_scheme_t scheme = {.tag = (sep - s == 5 && memcmp(s, "https", 5) == 0)
                                                  ? WASI_HTTP_TYPES_SCHEME_HTTPS
                                                  : WASI_HTTP_TYPES_SCHEME_HTTP};
    const char *authority = sep + 3, *path = authority;
    while (path < end && *path != '/') path++;

    wasi_http_types_own_fields_t fields = wasi_http_types_constructor_fields();
    header(fields, "content-type", "application/json", 16);
    header(fields, "idempotency-key", key, key_len);
    if (token) {
        buf_t bearer = {0};
        puts_(&bearer, "Bearer ");
        puts_(&bearer, token);
        header(fields, "authorization", bearer.ptr, bearer.len);
        free(bearer.ptr);
    }
    wasi_http_types_own_outgoing_request_t request = wasi_http_types_constructor_outgoing_request(fields);
    wasi_http_types_borrow_outgoing_request_t borrowed = wasi_http_types_borrow_outgoing_request(request);
    wasi_http_types_method_t method = {.tag = WASI_HTTP_TYPES_METHOD_POST};
    wasi_http_types_method_outgoing_request_set_method(borrowed, &method);
    wasi_http_types_method_outgoing_request_set_scheme(borrowed, &scheme);
    connector_string_t text = {(uint8_t *)authority, (size_t)(path - authority)};
    wasi_http_types_method_outgoing_request_set_authority(borrowed, &text);
    text = (connector_string_t){(uint8_t *)(path < end ? path : "/"), path < end ? (size_t)(end - path) : 1};
    wasi_http_types_method_outgoing_request_set_path_with_query(borrowed, &text);

    wasi_http_types_own_outgoing_body_t outgoing;
    wasi_http_types_method_outgoing_request_body(borrowed, &outgoing);
    wasi_http_outgoing_handler_own_future_incoming_response_t future;
    wasi_http_outgoing_handler_error_code_t error;
    if (!wasi_http_outgoing_handler_handle(request, NULL, &future, &error)) {
        wasi_http_types_error_code_free(&error);
        wasi_http_types_outgoing_body_drop_own(outgoing);
        *why = "the host refused the request";
        return 0;
    }
    wasi_http_types_own_output_stream_t stream;
    wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(outgoing), &stream);
    for (size_t at = 0; at < body->len; at += 4096) {
        size_t n = body->len - at < 4096 ? body->len - at : 4096;
        connector_list_u8_t chunk = {(uint8_t *)body->ptr + at, n};
        wasi_io_streams_stream_error_t stream_error;
        if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
                wasi_io_streams_borrow_output_stream(stream), &chunk, &stream_error)) {
            break;  // the response below says what went wrong
        }
    }
    wasi_io_streams_output_stream_drop_own(stream);
    wasi_http_types_error_code_t finish_error;
    if (!wasi_http_types_static_outgoing_body_finish(outgoing, NULL, &finish_error)) {
        wasi_http_types_error_code_free(&finish_error);
    }

    wasi_http_types_borrow_future_incoming_response_t waiting = wasi_http_types_borrow_future_incoming_response(future);
    wasi_io_poll_own_pollable_t ready = wasi_http_types_method_future_incoming_response_subscribe(waiting);
    wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
    wasi_io_poll_pollable_drop_own(ready);
    wasi_http_types_result_result_own_incoming_response_error_code_void_t got;
    int status = 0;
    *why = "no response";
    if (wasi_http_types_method_future_incoming_response_get(waiting, &got) && !got.is_err) {
        if (got.val.ok.is_err) {
            wasi_http_types_error_code_free(&got.val.ok.val.err);
            *why = "the request failed or was refused by the host";
        } else {
            wasi_http_types_own_incoming_response_t response = got.val.ok.val.ok;
            status = wasi_http_types_method_incoming_response_status(wasi_http_types_borrow_incoming_response(response));
            wasi_http_types_incoming_response_drop_own(response);
        }
    }
    wasi_http_types_future_incoming_response_drop_own(future);
    return status;
}

void exports_starling_plugin_deliver_describe(exports_starling_plugin_deliver_connector_info_t *ret) {
    memset(ret, 0, sizeof *ret);
    connector_string_dup(&ret->description, "POSTs each action's parameters as JSON");
    ret->settings.len = 1;
    ret->settings.ptr = calloc(1, sizeof *ret->settings.ptr);
    connector_string_dup(&ret->settings.ptr[0].name, "url");
    connector_string_dup(&ret->settings.ptr[0].description, "where to POST");
    ret->settings.ptr[0].required = true;
}

void exports_starling_plugin_deliver_deliver(exports_starling_plugin_deliver_list_action_t *actions,
                                             exports_starling_plugin_deliver_list_result_void_delivery_error_t *ret) {
    connector_string_t key, configured;
    connector_string_set(&key, "token");
    char *token = NULL;
    if (starling_plugin_config_get(&key, &configured)) {
        token = strndup((const char *)configured.ptr, configured.len);
        connector_string_free(&configured);
    }
    ret->len = actions->len;
    ret->ptr = calloc(actions->len ? actions->len : 1, sizeof(result_t));
    for (size_t i = 0; i < actions->len; i++) {
        const starling_plugin_types_action_t *action = &actions->ptr[i];
        connector_string_t url;
        if (!setting(action, "url", &url)) {
            ret->ptr[i] = failure(STARLING_PLUGIN_TYPES_DELIVERY_ERROR_PERMANENT, "no `url` setting");
            continue;
        }
        buf_t body = {0};
        puts_(&body, "{");
        for (size_t p = 0; p < action->params.len; p++) {
            if (p) puts_(&body, ",");
            put_json_string(&body, action->params.ptr[p].f0.ptr, action->params.ptr[p].f0.len);
            puts_(&body, ":");
            put_value(&body, &action->params.ptr[p].f1);
        }
        puts_(&body, "}");
        const char *why = NULL;
        int status = post(&url, token, (const char *)action->idempotency_key.ptr, action->idempotency_key.len, &body,
                          &why);
        free(body.ptr);
        if (status >= 200 && status < 300) {
            ret->ptr[i] = (result_t){.is_err = false};
        } else if (status == 0) {
            ret->ptr[i] = failure(STARLING_PLUGIN_TYPES_DELIVERY_ERROR_RETRYABLE, why);
        } else if (status == 429) {
            result_t r = {.is_err = true};
            r.val.err.tag = STARLING_PLUGIN_TYPES_DELIVERY_ERROR_RATE_LIMITED;
            r.val.err.val.rate_limited.retry_after_ms = 10000;
            connector_string_dup(&r.val.err.val.rate_limited.message, "rate limited");
            ret->ptr[i] = r;
        } else {
            buf_t message = {0};
            puts_(&message, "answered ");
            put_integer(&message, status);
            bool retry = status == 408 || status >= 500;
            ret->ptr[i] = failure(
                retry ? STARLING_PLUGIN_TYPES_DELIVERY_ERROR_RETRYABLE : STARLING_PLUGIN_TYPES_DELIVERY_ERROR_PERMANENT,
                message.ptr);
            free(message.ptr);
        }
    }
    free(token);
    exports_starling_plugin_deliver_list_action_free(actions);
}
