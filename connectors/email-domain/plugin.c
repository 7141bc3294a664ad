// Starling enricher in C: the domain of a visitor's email address, and whether it is a business
// address (not a free-mail provider).
//
// Configuration (all optional): `email_attribute` (default `email`), `domain_attribute`
// (default `email_domain`, a string), `business_attribute` (default `business_email`, a boolean).
//
// `enricher.h` is generated from wit/ by `starling plugin build`. Arguments of an exported
// function belong to it (freed here); what it returns is freed by the generated code after the
// host has read it.

#include "enricher.h"

#include <stdlib.h>
#include <string.h>

typedef starling_plugin_types_attribute_value_t value_t;
typedef starling_plugin_types_attribute_update_t update_t;

static const char *FREE_MAIL[] = {
    "gmail.com", "googlemail.com", "yahoo.com", "hotmail.com", "outlook.com", "live.com",
    "icloud.com", "me.com", "aol.com", "proton.me", "protonmail.com", "gmx.de", "gmx.net",
    "web.de", "mail.ru", "yandex.ru", "qq.com", "163.com", NULL,
};

// The configured value of `key`, or `fallback`; the caller frees it.
static char *setting(const char *key, const char *fallback) {
    enricher_string_t k, v;
    enricher_string_set(&k, key);
    if (!starling_plugin_config_get(&k, &v)) {
        return strdup(fallback);
    }
    char *s = malloc(v.len + 1);
    memcpy(s, v.ptr, v.len);
    s[v.len] = '\0';
    enricher_string_free(&v);
    return s;
}

static const value_t *attribute(const starling_plugin_types_profile_view_t *profile, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < profile->attributes.len; i++) {
        const enricher_string_t *have = &profile->attributes.ptr[i].name;
        if (have->len == n && memcmp(have->ptr, name, n) == 0) {
            return &profile->attributes.ptr[i].value;
        }
    }
    return NULL;
}

static bool text_equals(const value_t *v, const char *text) {
    return v && v->tag == STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_TEXT && v->val.text.len == strlen(text) &&
           memcmp(v->val.text.ptr, text, v->val.text.len) == 0;
}

// The lowercased domain of an address, or NULL when it has none; the caller frees it.
static char *domain_of(const enricher_string_t *email) {
    size_t at = email->len;
    for (size_t i = 0; i < email->len; i++) {
        if (email->ptr[i] == '@') at = i;
    }
    if (at == email->len) return NULL;
    size_t start = at + 1, end = email->len;
    while (end > start && (email->ptr[end - 1] == ' ' || email->ptr[end - 1] == '\t')) end--;
    if (end == start || memchr(email->ptr + start, '.', end - start) == NULL) return NULL;
    char *domain = malloc(end - start + 1);
    for (size_t i = start; i < end; i++) {
        uint8_t c = email->ptr[i];
        domain[i - start] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : (char)c;
    }
    domain[end - start] = '\0';
    return domain;
}

static bool is_free_mail(const char *domain) {
    for (const char **d = FREE_MAIL; *d; d++) {
        if (strcmp(*d, domain) == 0) return true;
    }
    return false;
}

// Called for events, and for visit ends when the host's configuration asks for them: the answer
// depends on the profile only.
bool exports_starling_plugin_enrich_enrich(exports_starling_plugin_enrich_occasion_t *occasion,
                                           exports_starling_plugin_enrich_profile_view_t *profile,
                                           exports_starling_plugin_enrich_list_attribute_update_t *ret,
                                           exports_starling_plugin_enrich_enrich_error_t *err) {
    (void)err;
    char *email_attribute = setting("email_attribute", "email");
    char *domain_attribute = setting("domain_attribute", "email_domain");
    char *business_attribute = setting("business_attribute", "business_email");
    ret->ptr = NULL;
    ret->len = 0;

    const value_t *email = attribute(profile, email_attribute);
    char *domain = NULL;
    if (email && email->tag == STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_TEXT) {
        domain = domain_of(&email->val.text);
    }
    if (domain) {
        bool business = !is_free_mail(domain);
        const value_t *had_business = attribute(profile, business_attribute);
        bool business_known = had_business && had_business->tag == STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_BOOLEAN &&
                              had_business->val.boolean == business;
        bool domain_known = text_equals(attribute(profile, domain_attribute), domain);
        if (!domain_known || !business_known) {
            ret->ptr = calloc(2, sizeof(update_t));
        }
        if (!domain_known) {
            update_t *u = &ret->ptr[ret->len++];
            enricher_string_dup(&u->name, domain_attribute);
            u->value.is_some = true;
            u->value.val.tag = STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_TEXT;
            enricher_string_dup(&u->value.val.val.text, domain);
        }
        if (!business_known) {
            update_t *u = &ret->ptr[ret->len++];
            enricher_string_dup(&u->name, business_attribute);
            u->value.is_some = true;
            u->value.val.tag = STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_BOOLEAN;
            u->value.val.val.boolean = business;
        }
        free(domain);
    }

    free(email_attribute);
    free(domain_attribute);
    free(business_attribute);
    exports_starling_plugin_enrich_occasion_free(occasion);
    exports_starling_plugin_enrich_profile_view_free(profile);
    return true;
}
