/*
 * ebb_plugin.h: the ebb plugin ABI, version 1 (a contract; see docs/PLUGINS.md).
 *
 * A plugin is a shared library that exports one function,
 *
 *     const EbbPluginV1 *ebb_plugin_entry(void);
 *
 * returning a pointer to a static table. The agent reads abi_version first and refuses a version it does not
 * know; it refuses a table whose struct_size is smaller than its own sizeof(EbbPluginV1).
 *
 * Data crosses as JSON in NUL-terminated UTF-8 strings:
 *   create(config_json, &error)        -> an instance, or NULL with *error set to a message (or NULL)
 *   check_idle(instance, ctx_json)     -> {"verdict":"idle"|"busy"|"error","message":"..."}
 *   on_event(instance, event_json)     -> NULL when handled, else an error message
 *   destroy(instance)
 * Every string a plugin returns is allocated by the plugin and freed by the agent through the plugin's
 * free_string. Strings the agent passes in belong to the agent and live until the call returns.
 *
 * The agent calls an instance from one thread at a time (a dedicated thread per plugin) with a timeout, and
 * never unloads the library. Calls must not block for long: answer check_idle from state that hooks or a
 * background thread of the plugin keep up to date.
 *
 * This header is kept in sync with sdk/src/plugin.rs by sdk/tests/header_sync.rs.
 */
#ifndef EBB_PLUGIN_H
#define EBB_PLUGIN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes. */
#define EBB_PLUGIN_ABI_VERSION 1u

/* The name of the one exported symbol. */
#define EBB_PLUGIN_ENTRY_SYMBOL "ebb_plugin_entry"

/* Capability bits. */
#define EBB_CAP_CHECK_IDLE 1u /* answers check_idle; asked while the node drains */
#define EBB_CAP_EVENTS 2u     /* wants hook events through on_event */

/* An instance made by create: opaque to the agent. */
typedef struct EbbPluginInstance EbbPluginInstance;

typedef struct EbbPluginV1 {
    /* EBB_PLUGIN_ABI_VERSION. */
    uint32_t abi_version;
    /* sizeof(EbbPluginV1). */
    uint32_t struct_size;
    /* EBB_CAP_CHECK_IDLE | EBB_CAP_EVENTS. */
    uint32_t capabilities;
    /* Zero. */
    uint32_t reserved;
    /* Static NUL-terminated UTF-8 strings. */
    const char *name;
    const char *version;
    /* config_json: the plugin's `config` table as JSON ("null" when absent). */
    EbbPluginInstance *(*create)(const char *config_json, char **error);
    /* ctx_json: {"node":..,"drain_id":..,"started_at_ms":..,"elapsed_ms":..,"timeout_ms":..}; more fields may
     * come. Returns {"verdict":"idle"|"busy"|"error","message":"..."}. */
    char *(*check_idle)(EbbPluginInstance *instance, const char *ctx_json);
    /* event_json: {"event":"drain_started"|"reloaded"|"drained"|"undrained"|"stopping", ...}; ignore
     * events you do not know. Returns NULL, or an error message. */
    char *(*on_event)(EbbPluginInstance *instance, const char *event_json);
    /* Frees a string this plugin returned. NULL is a no-op. */
    void (*free_string)(char *s);
    /* Frees an instance. */
    void (*destroy)(EbbPluginInstance *instance);
} EbbPluginV1;

/* What the plugin defines. */
typedef const EbbPluginV1 *(*EbbPluginEntryFn)(void);
const EbbPluginV1 *ebb_plugin_entry(void);

#ifdef __cplusplus
}
#endif

#endif /* EBB_PLUGIN_H */
