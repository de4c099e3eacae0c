/*
 * An ebb plugin in plain C: the node is busy while a file exists.
 *
 *     [[plugins]]
 *     name = "maintenance"
 *     path = "/usr/lib/ebb/plugins/libebb_busy_file.so"
 *     config = { busy_file = "/run/myapp/busy" }
 *
 * Your application creates the file while it has work that must finish before the node goes away (a batch
 * job, an upload) and removes it when done; the drain waits for that, and the status shows
 * "plugin maintenance: /run/myapp/busy exists (since drain d-123)".
 *
 * Build:  cc -shared -fPIC -O2 -Wall -I sdk/include -o libebb_busy_file.so examples/c-plugin/busy_file.c
 *
 * Rules of the ABI (see ebb_plugin.h and docs/PLUGINS.md): every string returned is malloc'd here and freed
 * by the agent through free_string; strings passed in belong to the agent. Calls for one instance come from
 * one thread at a time, so the instance needs no lock. A real plugin would use a JSON library (cJSON,
 * jansson); the small reader below handles only what this example needs.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ebb_plugin.h"

struct EbbPluginInstance {
    char *busy_file;
    char drain_id[128]; /* from the last drain_started; empty when none */
};

/* A heap copy of s (NULL on allocation failure). */
static char *copy(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

/*
 * The string value of "key" in a flat JSON object, unescaped into a new heap string; NULL when absent or
 * not a plain string. Enough for this example, not a JSON parser.
 */
static char *json_string(const char *json, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *p = strstr(json, pattern);
    if (!p) return NULL;
    p += strlen(pattern);
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    if (*p++ != ':') return NULL;
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    if (*p++ != '"') return NULL;
    char *out = malloc(strlen(p) + 1);
    if (!out) return NULL;
    size_t n = 0;
    for (; *p && *p != '"'; p++) {
        if (*p == '\\') {
            p++;
            if (*p == '"' || *p == '\\' || *p == '/') out[n++] = *p;
            else if (*p == 'n') out[n++] = '\n';
            else if (*p == 't') out[n++] = '\t';
            else { free(out); return NULL; } /* \uXXXX and friends: not supported here */
        } else {
            out[n++] = *p;
        }
    }
    if (*p != '"') { free(out); return NULL; }
    out[n] = '\0';
    return out;
}

/* s as the body of a JSON string, appended to out (which has room for 6 * strlen(s) + 1 more). */
static void json_escape_into(char *out, const char *s) {
    out += strlen(out);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { *out++ = '\\'; *out++ = (char)c; }
        else if (c < 0x20) out += sprintf(out, "\\u%04x", c);
        else *out++ = (char)c;
    }
    *out = '\0';
}

/* {"verdict":"<verdict>","message":"<message>"} in a new heap string. */
static char *reply(const char *verdict, const char *message) {
    size_t room = strlen(verdict) + 6 * strlen(message) + 64;
    char *out = malloc(room);
    if (!out) return NULL;
    snprintf(out, room, "{\"verdict\":\"%s\",\"message\":\"", verdict);
    json_escape_into(out, message);
    strcat(out, "\"}");
    return out;
}

static EbbPluginInstance *create(const char *config_json, char **error) {
    char *busy_file = config_json ? json_string(config_json, "busy_file") : NULL;
    if (!busy_file || !*busy_file) {
        free(busy_file);
        if (error) *error = copy("invalid config: set config = { busy_file = \"/run/myapp/busy\" }");
        return NULL;
    }
    EbbPluginInstance *self = calloc(1, sizeof *self);
    if (!self) {
        free(busy_file);
        if (error) *error = copy("out of memory");
        return NULL;
    }
    self->busy_file = busy_file;
    if (error) *error = NULL;
    return self;
}

static char *check_idle(EbbPluginInstance *self, const char *ctx_json) {
    (void)ctx_json; /* this plugin needs nothing from the context */
    if (access(self->busy_file, F_OK) != 0) return reply("idle", "");
    char message[512];
    if (self->drain_id[0])
        snprintf(message, sizeof message, "%s exists (since drain %s)", self->busy_file, self->drain_id);
    else
        snprintf(message, sizeof message, "%s exists", self->busy_file);
    return reply("busy", message);
}

static char *on_event(EbbPluginInstance *self, const char *event_json) {
    char *event = json_string(event_json, "event");
    if (!event) return copy("event_json has no \"event\"");
    if (strcmp(event, "drain_started") == 0) {
        char *id = json_string(event_json, "drain_id");
        snprintf(self->drain_id, sizeof self->drain_id, "%s", id ? id : "");
        free(id);
    } else if (strcmp(event, "undrained") == 0) {
        self->drain_id[0] = '\0';
    }
    /* Other events (and ones newer than this plugin) are ignored. */
    free(event);
    return NULL;
}

static void free_string(char *s) { free(s); }

static void destroy(EbbPluginInstance *self) {
    if (!self) return;
    free(self->busy_file);
    free(self);
}

static const EbbPluginV1 TABLE = {
    .abi_version = EBB_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(EbbPluginV1),
    .capabilities = EBB_CAP_CHECK_IDLE | EBB_CAP_EVENTS,
    .reserved = 0,
    .name = "busy-file",
    .version = "1.0.0",
    .create = create,
    .check_idle = check_idle,
    .on_event = on_event,
    .free_string = free_string,
    .destroy = destroy,
};

const EbbPluginV1 *ebb_plugin_entry(void) { return &TABLE; }
