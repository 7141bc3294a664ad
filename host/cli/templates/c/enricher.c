// {{name}}: a Starling enricher in C. Sets a string attribute (configuration `attribute`, default
// `last_event`) to the name of the latest event.
//
// `enricher.h` is generated from the WIT world by `starling plugin build`. The arguments of an
// exported function belong to it (freed here); what it returns is freed by the generated code.

#include "enricher.h"

#include <stdlib.h>
#include <string.h>

typedef starling_plugin_types_attribute_update_t update_t;

// Called for events, and for visit ends when the host's configuration asks for them (this one
// answers nothing then).
bool exports_starling_plugin_enrich_enrich(exports_starling_plugin_enrich_occasion_t *occasion,
                                           exports_starling_plugin_enrich_profile_view_t *profile,
                                           exports_starling_plugin_enrich_list_attribute_update_t *ret,
                                           exports_starling_plugin_enrich_enrich_error_t *err) {
    (void)err;
    ret->ptr = NULL;
    ret->len = 0;
    if (occasion->tag != STARLING_PLUGIN_TYPES_OCCASION_EVENT) {
        exports_starling_plugin_enrich_occasion_free(occasion);
        exports_starling_plugin_enrich_profile_view_free(profile);
        return true;
    }
    starling_plugin_types_event_t *event = &occasion->val.event;
    enricher_string_t key, attribute;
    enricher_string_set(&key, "attribute");
    if (!starling_plugin_config_get(&key, &attribute)) {
        enricher_string_dup(&attribute, "last_event");
    }
    bool unchanged = false;
    for (size_t i = 0; i < profile->attributes.len; i++) {
        starling_plugin_types_attribute_t *a = &profile->attributes.ptr[i];
        if (a->name.len == attribute.len && memcmp(a->name.ptr, attribute.ptr, attribute.len) == 0 &&
            a->value.tag == STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_TEXT && a->value.val.text.len == event->name.len &&
            memcmp(a->value.val.text.ptr, event->name.ptr, event->name.len) == 0) {
            unchanged = true;
        }
    }
    if (unchanged) {
        enricher_string_free(&attribute);
    } else {
        ret->ptr = calloc(1, sizeof(update_t));
        ret->len = 1;
        ret->ptr[0].name = attribute;  // ownership moves into the result
        ret->ptr[0].value.is_some = true;
        ret->ptr[0].value.val.tag = STARLING_PLUGIN_TYPES_ATTRIBUTE_VALUE_TEXT;
        enricher_string_dup_n(&ret->ptr[0].value.val.val.text, (const char *)event->name.ptr, event->name.len);
    }
    exports_starling_plugin_enrich_occasion_free(occasion);
    exports_starling_plugin_enrich_profile_view_free(profile);
    return true;
}
