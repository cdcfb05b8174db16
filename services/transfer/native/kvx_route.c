/*
 * kvx routes: the decode side's fast path, placing a request's KV straight from the message callback.
 *
 * A sink is a KV cache in this process; a source, a connection whose sender's KV cache is mapped
 * here; a route, one expected request with its slots. A header that comes from a source and names
 * a routed request is parsed, checked as KVReceiver._check would, copied into place and recorded
 * as due for an ack right in the message callback, with no event and no Python; only the
 * request's completion (and acks falling due) becomes an event. Any header this path does not
 * take in full (malformed, unexpected, out of bounds, from a ring, for a request not routed)
 * queues as a plain message, and Python handles it (or refuses it) as before. Sinks, sources and
 * routes live under the node's route_lock, which a placement holds throughout, so removing one
 * waits for a placement in progress and nothing is written through it afterwards.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "kvx.h"

/* Acks of routed headers fall due (an event) once a request completes, or once ACK_BATCH of them
 * wait, or ACK_DELAY_S after the first began to: the same rule as the receiver's for its own. */
#define KVX_ACK_BATCH 64
#define KVX_ACK_DELAY_S 0.002
#define KVX_ROUTE_BUCKETS 256
#define KVX_MAX_SOURCE_BLOCKS 4096

typedef struct kvx_sink {
    kvx_node *node;
    uint64_t cache;        /* [num_layers, 2, num_blocks, block_size, heads, dim] */
    uint64_t plane_bytes;  /* one [layer, k/v] plane */
    uint64_t token_bytes;  /* K (or V) of one token of one layer */
    uint32_t num_layers, block_size;
    struct kvx_route *buckets[KVX_ROUTE_BUCKETS];
} kvx_sink;

struct kvx_source {
    kvx_source *next;
    kvx_sink *sink;
    uint64_t tag;          /* what the connection's messages carry here */
    uint64_t address;      /* the sender's KV cache, in the sender's address space */
    uint64_t length;
    uint64_t mapped;       /* where it is mapped here */
    uint64_t *acks;        /* sequences placed and not yet taken for acking */
    size_t num_acks, capacity;
    double acks_since;     /* when the first of them fell due; 0: none, -1: reported as due */
};

typedef struct kvx_route {
    struct kvx_route *next; /* in its bucket */
    kvx_sink *sink;
    uint64_t key;          /* the caller's name for it, reported when it completes */
    uint64_t source_tag;   /* the source that placed into it (0: none yet); another one is not routed */
    uint32_t token_start, num_tokens;
    uint64_t remaining;    /* (layer, token) pairs not written yet */
    int finished;          /* complete: nothing more is placed through the route */
    uint64_t *slots;       /* cache slot of each of its tokens */
    uint64_t *written;     /* per layer, one bit per token */
    size_t words;          /* of `written`, per layer */
    uint32_t id_length;
    char id[];
} kvx_route;

/* The fields of a KVHeader (kv.proto) that a routed header has: see parse_header. */
typedef struct {
    const char *id;
    uint64_t id_length;
    uint64_t field[13];    /* varint fields by number: 2 layer ... 8 v_address, 12 source_offset */
    const uint8_t *blocks; /* source_blocks, packed */
    uint64_t blocks_length;
    uint32_t seen;         /* bit per field number present */
} kvx_header;

enum { F_ID = 1, F_LAYER, F_TOKEN_START, F_NUM_TOKENS, F_PAYLOAD, F_SEQUENCE, F_K_ADDRESS, F_V_ADDRESS,
       F_BLOCKS = 11, F_OFFSET = 12 };

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t value = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t byte = *(*p)++;
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return 0;
}

/* Parses the serialised KVHeader the way KVSender writes one from its shared cache: each field
 * at most once, source_blocks packed, no rkeys, uint32 fields within range. 0 for anything else
 * (then Python parses it and decides). */
static int parse_header(const uint8_t *p, size_t length, kvx_header *h)
{
    const uint8_t *end = p + length;
    memset(h, 0, sizeof(*h));
    while (p < end) {
        uint64_t key, value;
        unsigned field;
        if (!read_varint(&p, end, &key) || key >> 3 > 12) {
            return 0;
        }
        field = (unsigned)(key >> 3);
        if (field == 0 || field == 9 || field == 10 || (h->seen & (1u << field))) {
            return 0;
        }
        h->seen |= 1u << field;
        if (!read_varint(&p, end, &value)) {
            return 0;
        }
        if (field == F_ID || field == F_BLOCKS) {
            if ((key & 7) != 2 || value > (uint64_t)(end - p)) {
                return 0;
            }
            if (field == F_ID) {
                h->id = (const char *)p;
                h->id_length = value;
            } else {
                h->blocks = p;
                h->blocks_length = value;
            }
            p += value;
        } else {
            int narrow = field != F_PAYLOAD && field != F_SEQUENCE && field != F_K_ADDRESS && field != F_V_ADDRESS;
            if ((key & 7) != 0 || (narrow && value > UINT32_MAX)) {
                return 0;
            }
            h->field[field] = value;
        }
    }
    return h->id_length > 0 && h->blocks_length > 0 && h->field[F_NUM_TOKENS] > 0 && h->field[F_K_ADDRESS] &&
           h->field[F_V_ADDRESS];
}

static uint64_t hash_id(const char *id, size_t length)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < length; ++i) {
        h = (h ^ (uint8_t)id[i]) * 1099511628211ull;
    }
    return h;
}

static kvx_route **route_slot(kvx_sink *sink, const char *id, size_t length)
{
    kvx_route **at = &sink->buckets[hash_id(id, length) % KVX_ROUTE_BUCKETS];
    while (*at != NULL && ((*at)->id_length != length || memcmp((*at)->id, id, length) != 0)) {
        at = &(*at)->next;
    }
    return at;
}

static kvx_source **source_slot(kvx_node *node, uint64_t tag)
{
    kvx_source **at = &node->sources;
    while (*at != NULL && (*at)->tag != tag) {
        at = &(*at)->next;
    }
    return at;
}

/* Whether [address, address + length) lies inside the source's cache (in the sender's addresses). */
static int source_holds(const kvx_source *source, uint64_t address, uint64_t length)
{
    return address >= source->address && length <= source->length &&
           address - source->address <= source->length - length;
}

/* Marks tokens [a, b) of `layer` written; returns how many were not written before. */
static uint64_t mark_written(kvx_route *route, uint32_t layer, uint64_t a, uint64_t b)
{
    uint64_t *bits = route->written + (size_t)layer * route->words, fresh = 0;
    for (uint64_t i = a; i < b; ++i) {
        uint64_t bit = 1ull << (i % 64);
        if (!(bits[i / 64] & bit)) {
            bits[i / 64] |= bit;
            ++fresh;
        }
    }
    route->remaining -= fresh;
    return fresh;
}

static void route_done(kvx_node *node, kvx_route *route, uint64_t tag)
{
    struct {
        uint64_t key;
        double at;
    } done = {route->key, now_s()};
    route->finished = 1;
    push_event(node, KVX_EVENT_ROUTE_DONE, 0, tag, &done, sizeof(done));
}

/* Places one header if it is routed (see the top of the file); 1 when it did, 0 when the message
 * should go to Python. Called from the message callback. */
int place_header(kvx_node *node, uint64_t tag, const void *data, size_t length)
{
    uint32_t blocks[KVX_MAX_SOURCE_BLOCKS];
    kvx_header h;
    kvx_source *source;
    kvx_sink *sink;
    kvx_route *route;
    uint64_t count = 0, max_block = 0, n, a, bs, tb, layer, offset, k_source, v_source, k_dest, v_dest;
    uint64_t run_source = 0, run_dest = 0, run_length = 0;
    int placed = 0;

    if (__atomic_load_n(&node->sources, __ATOMIC_ACQUIRE) == NULL || !parse_header(data, length, &h)) {
        return 0;
    }
    for (const uint8_t *p = h.blocks, *end = h.blocks + h.blocks_length; p < end;) {
        uint64_t block;
        if (count == KVX_MAX_SOURCE_BLOCKS || !read_varint(&p, end, &block) || block > UINT32_MAX) {
            return 0;
        }
        blocks[count++] = (uint32_t)block;
        max_block = block > max_block ? block : max_block;
    }
    pthread_mutex_lock(&node->route_lock);
    source = *source_slot(node, tag);
    if (source == NULL) {
        goto out;
    }
    sink = source->sink;
    bs = sink->block_size;
    tb = sink->token_bytes;
    n = h.field[F_NUM_TOKENS];
    layer = h.field[F_LAYER];
    offset = h.field[F_OFFSET];
    /* The receiver's checks (KVReceiver._check), for a header from the shared cache. */
    if (layer >= sink->num_layers || h.field[F_PAYLOAD] != 2 * n * tb || count * bs < offset + n ||
        !source_holds(source, h.field[F_K_ADDRESS], (max_block + 1) * bs * tb) ||
        !source_holds(source, h.field[F_V_ADDRESS], (max_block + 1) * bs * tb)) {
        goto out;
    }
    route = *route_slot(sink, h.id, h.id_length);
    if (route == NULL || route->finished || (route->source_tag && route->source_tag != tag) ||
        h.field[F_TOKEN_START] < route->token_start || n > route->num_tokens ||
        h.field[F_TOKEN_START] - route->token_start > route->num_tokens - n) {
        goto out;
    }
    if (source->num_acks == source->capacity) {
        size_t capacity = source->capacity ? 2 * source->capacity : KVX_ACK_BATCH;
        uint64_t *acks = realloc(source->acks, capacity * sizeof(*acks));
        if (acks == NULL) {
            goto out;
        }
        source->acks = acks;
        source->capacity = capacity;
    }
    /* Copy each run of slots consecutive on both sides, K and V, as KVReceiver._fetch would. */
    a = h.field[F_TOKEN_START] - route->token_start;
    k_source = source->mapped + (h.field[F_K_ADDRESS] - source->address);
    v_source = source->mapped + (h.field[F_V_ADDRESS] - source->address);
    k_dest = sink->cache + 2 * layer * sink->plane_bytes;
    v_dest = k_dest + sink->plane_bytes;
    for (uint64_t i = 0; i <= n; ++i) {
        uint64_t from = 0, to = 0;
        if (i < n) {
            uint64_t p = offset + i;
            from = (uint64_t)blocks[p / bs] * bs + p % bs;
            to = route->slots[a + i];
            if (run_length && from == run_source + run_length && to == run_dest + run_length) {
                ++run_length;
                continue;
            }
        }
        if (run_length) {
            copy_streaming((char *)(uintptr_t)(k_dest + run_dest * tb),
                           (const char *)(uintptr_t)(k_source + run_source * tb), run_length * tb);
            copy_streaming((char *)(uintptr_t)(v_dest + run_dest * tb),
                           (const char *)(uintptr_t)(v_source + run_source * tb), run_length * tb);
        }
        run_source = from;
        run_dest = to;
        run_length = 1;
    }
#if defined(__x86_64__)
    _mm_sfence();
#endif
    placed = 1;
    route->source_tag = tag;
    source->acks[source->num_acks++] = h.field[F_SEQUENCE];
    if (source->acks_since == 0) {
        source->acks_since = now_s();
        if (!pthread_equal(pthread_self(), node->progress_thread)) {
            ucp_worker_signal(node->worker); /* the progress thread may sleep with no ack deadline */
        }
    }
    mark_written(route, (uint32_t)layer, a, a + n);
    if (route->remaining == 0) {
        route_done(node, route, tag);
    } else {
        node->spin_until = now_s() + node->spin_s;
        if (source->num_acks >= KVX_ACK_BATCH && source->acks_since > 0) {
            source->acks_since = -1;
            push_event(node, KVX_EVENT_ACKS_DUE, 0, tag, NULL, 0);
        }
    }
out:
    pthread_mutex_unlock(&node->route_lock);
    return placed;
}

/* Reports the sources whose acks have waited ACK_DELAY_S; returns when the next will be due (0: none). */
double acks_due(kvx_node *node, double now)
{
    double next = 0;
    pthread_mutex_lock(&node->route_lock);
    for (kvx_source *source = node->sources; source != NULL; source = source->next) {
        if (source->acks_since <= 0) {
            continue;
        }
        if (now >= source->acks_since + KVX_ACK_DELAY_S) {
            source->acks_since = -1;
            push_event(node, KVX_EVENT_ACKS_DUE, 0, source->tag, NULL, 0);
        } else if (next == 0 || source->acks_since + KVX_ACK_DELAY_S < next) {
            next = source->acks_since + KVX_ACK_DELAY_S;
        }
    }
    pthread_mutex_unlock(&node->route_lock);
    return next;
}

/* ---- the API ------------------------------------------------------------------------------------ */

void kvx_set_spin(kvx_node *node, double spin_s) { node->spin_s = spin_s; }

/* A sink: the KV cache at `cache` in this process, which routed headers are placed into. */
kvx_sink *kvx_sink_open(kvx_node *node, uint64_t cache, uint32_t num_layers, uint64_t plane_bytes,
                        uint64_t token_bytes, uint32_t block_size)
{
    kvx_sink *sink = calloc(1, sizeof(*sink));
    if (sink != NULL) {
        sink->node = node;
        sink->cache = cache;
        sink->num_layers = num_layers;
        sink->plane_bytes = plane_bytes;
        sink->token_bytes = token_bytes;
        sink->block_size = block_size;
    }
    return sink;
}

static void free_route(kvx_route *route)
{
    free(route->slots);
    free(route->written);
    free(route);
}

static void free_source(kvx_source *source)
{
    free(source->acks);
    free(source);
}

/* Closes the sink with its sources and routes; once it returns, nothing more is placed into it. */
void kvx_sink_close(kvx_sink *sink)
{
    kvx_node *node = sink->node;
    pthread_mutex_lock(&node->route_lock);
    for (kvx_source **at = &node->sources; *at != NULL;) {
        kvx_source *source = *at;
        if (source->sink == sink) {
            *at = source->next;
            free_source(source);
        } else {
            at = &source->next;
        }
    }
    for (size_t b = 0; b < KVX_ROUTE_BUCKETS; ++b) {
        while (sink->buckets[b] != NULL) {
            kvx_route *route = sink->buckets[b];
            sink->buckets[b] = route->next;
            free_route(route);
        }
    }
    pthread_mutex_unlock(&node->route_lock);
    free(sink);
}

/* Headers that carry `tag` come from a sender whose KV cache, at `address` (`length` bytes) in its
 * own address space, is mapped here at `mapped`. 0, or an errno (EEXIST: the tag has a source). */
int kvx_sink_source(kvx_sink *sink, uint64_t tag, uint64_t address, uint64_t length, uint64_t mapped)
{
    kvx_node *node = sink->node;
    kvx_source *source;
    int err = 0;
    pthread_mutex_lock(&node->route_lock);
    if (*source_slot(node, tag) != NULL) {
        err = EEXIST;
    } else if ((source = calloc(1, sizeof(*source))) == NULL) {
        err = ENOMEM;
    } else {
        source->sink = sink;
        source->tag = tag;
        source->address = address;
        source->length = length;
        source->mapped = mapped;
        source->next = node->sources;
        __atomic_store_n(&node->sources, source, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&node->route_lock);
    return err;
}

/* Moves the sequences placed from `tag`'s source and not yet acked into `out` (at most
 * `capacity`); returns how many, or minus how many there are when they do not fit. */
long kvx_sink_take_acks(kvx_sink *sink, uint64_t tag, uint64_t *out, size_t capacity)
{
    kvx_node *node = sink->node;
    kvx_source *source;
    long count = 0;
    pthread_mutex_lock(&node->route_lock);
    source = *source_slot(node, tag);
    if (source != NULL && source->sink == sink) {
        count = (long)source->num_acks;
        if (source->num_acks > capacity) {
            count = -count;
        } else {
            memcpy(out, source->acks, source->num_acks * sizeof(*out));
            source->num_acks = 0;
            source->acks_since = 0;
        }
    }
    pthread_mutex_unlock(&node->route_lock);
    return count;
}

/* Forgets `tag`'s source (acks not taken are dropped); once it returns nothing is read from it. */
void kvx_sink_unsource(kvx_sink *sink, uint64_t tag)
{
    kvx_node *node = sink->node;
    kvx_source **at;
    pthread_mutex_lock(&node->route_lock);
    at = source_slot(node, tag);
    if (*at != NULL && (*at)->sink == sink) {
        kvx_source *source = *at;
        *at = source->next;
        free_source(source);
    }
    pthread_mutex_unlock(&node->route_lock);
}

/* Routes request `id`: tokens [token_start, token_start + num_tokens) of every layer go to `slots`
 * of the sink's cache (the caller checked them). Its completion is reported as `key`. NULL when
 * the id is routed already or memory runs out. */
kvx_route *kvx_route_open(kvx_sink *sink, uint64_t key, const char *id, uint32_t id_length, uint32_t token_start,
                          uint32_t num_tokens, const uint64_t *slots)
{
    kvx_node *node = sink->node;
    kvx_route **at, *route = calloc(1, sizeof(*route) + id_length);
    if (route == NULL || num_tokens == 0) {
        free(route);
        return NULL;
    }
    route->sink = sink;
    route->key = key;
    route->token_start = token_start;
    route->num_tokens = num_tokens;
    route->remaining = (uint64_t)num_tokens * sink->num_layers;
    route->words = (num_tokens + 63) / 64;
    route->id_length = id_length;
    memcpy(route->id, id, id_length);
    route->slots = malloc(num_tokens * sizeof(*slots));
    route->written = calloc(route->words * sink->num_layers, sizeof(*route->written));
    if (route->slots == NULL || route->written == NULL) {
        free_route(route);
        return NULL;
    }
    memcpy(route->slots, slots, num_tokens * sizeof(*slots));
    pthread_mutex_lock(&node->route_lock);
    at = route_slot(sink, id, id_length);
    if (*at == NULL) {
        *at = route;
    }
    pthread_mutex_unlock(&node->route_lock);
    if (*at != route) {
        free_route(route);
        return NULL;
    }
    return route;
}

/* Removes the route; once it returns, nothing more is placed through it. */
void kvx_route_close(kvx_route *route)
{
    kvx_node *node = route->sink->node;
    kvx_route **at;
    pthread_mutex_lock(&node->route_lock);
    at = route_slot(route->sink, route->id, route->id_length);
    if (*at == route) {
        *at = route->next;
    }
    pthread_mutex_unlock(&node->route_lock);
    free_route(route);
}

/* Records tokens [a, b) of `layer` as written by the caller (a header Python placed itself);
 * returns 1 when that completed the route (no event is then reported), else 0. */
int kvx_route_mark(kvx_route *route, uint32_t layer, uint32_t a, uint32_t b)
{
    kvx_node *node = route->sink->node;
    int completed = 0;
    pthread_mutex_lock(&node->route_lock);
    if (layer < route->sink->num_layers && a < b && b <= route->num_tokens && !route->finished) {
        mark_written(route, layer, a, b);
        completed = route->finished = route->remaining == 0;
    }
    pthread_mutex_unlock(&node->route_lock);
    return completed;
}

/* The tag of the source that placed KV through the route (0: none). */
uint64_t kvx_route_source(kvx_route *route)
{
    uint64_t tag;
    pthread_mutex_lock(&route->sink->node->route_lock);
    tag = route->source_tag;
    pthread_mutex_unlock(&route->sink->node->route_lock);
    return tag;
}
