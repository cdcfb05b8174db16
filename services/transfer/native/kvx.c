/*
 * kvx: the data path of the KV hand-off, in C on UCP, so that no Python runs per byte.
 *
 * A node is one UCP context and worker (thread mode MULTI) with a progress thread that sleeps
 * in ucp_worker_wait. It offers five things (and, for logs, the transports of an endpoint's lanes):
 *   - short messages (UCP active messages, eager): every message a connection sends carries the
 *     tag its peer gave it, and lands in the receiving node's event queue;
 *   - memory regions: existing memory registered with ucp_mem_map, or new memory that UCX
 *     allocates itself (shared memory a peer on the host can map), with the rkey a peer needs;
 *   - fetch: RMA gets from a peer's region into local memory, posted (kvx_fetch_post, as many as
 *     come) and then waited for in the calling thread (kvx_fetch_wait) while the progress thread
 *     stands by; or, when the peer's region is shared memory that UCX maps into this process
 *     (ucp_rkey_ptr), a plain copy from the mapping (kvx_copy_kv), the fastest way across one host
 *     (kvx_prefault maps all of it up front: a first touch costs a page fault per 4 KiB);
 *   - spin: a caller may progress the worker itself for a while (kvx_spin ... kvx_spin_end).
 *     Meanwhile the progress thread stands by and the worker stays unarmed, so a peer's next
 *     message needs no wake-up signal: a send then takes about 2 us here instead of 12;
 *   - routes (kvx_route.c): the decode side places the KV of expected requests straight from
 *     the message callback, with no event per header.
 * Events (messages, failed connections) queue up in C and an eventfd becomes readable, so the
 * event loop wakes once per burst and drains them all with kvx_poll.
 *
 * Endpoints use UCP_ERR_HANDLING_MODE_NONE: with error handling on, UCX leaves out cma (and
 * shared memory), and gets fall back to software emulation over tcp, about 20x slower here. A
 * dead peer still shows: fetches and sends fail with an error status (checked by killing the
 * peer mid-run), and the control connection (a TCP socket, services/transfer/wire.py) ends as well.
 * Python calls these functions through ctypes, which drops the GIL while they run.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <ucp/api/ucp.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "kvx.h"

#define KVX_AM_ID 17

typedef struct {
    int pending;          /* gets posted and not completed */
    ucs_status_t status;  /* the first failure among them */
    int holding;          /* the progress thread stands by until kvx_fetch_wait (see hold_progress) */
} kvx_batch;

typedef struct kvx_conn {
    kvx_node *node;
    ucp_ep_h ep;
    uint64_t tag;       /* what this side's messages carry: the peer's id for this connection */
    uint64_t local_tag; /* what a failure of this connection is reported as, locally */
    pthread_mutex_t lock;
    kvx_batch fetches;  /* gets posted by kvx_fetch_post, until kvx_fetch_wait */
    int answers_gets;   /* the peer reads this side's memory with gets that this worker must answer */
} kvx_conn;

typedef struct kvx_region {
    kvx_node *node;
    ucp_mem_h memh;
} kvx_region;

typedef struct kvx_rkey {
    ucp_rkey_h rkey;
} kvx_rkey;

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void push_event(kvx_node *node, uint32_t type, int32_t status, uint64_t tag, const void *data,
                size_t length)
{
    kvx_event *ev = malloc(sizeof(*ev) + length);
    uint64_t one = 1;
    int spinning;
    if (ev == NULL) {
        return;
    }
    ev->next = NULL;
    ev->type = type;
    ev->status = status;
    ev->tag = tag;
    ev->length = (uint32_t)length;
    if (length) {
        memcpy(ev->data, data, length);
    }
    pthread_mutex_lock(&node->events_lock);
    if (node->tail) {
        node->tail->next = ev;
    } else {
        node->head = ev;
    }
    node->tail = ev;
    spinning = node->spinning;
    pthread_mutex_unlock(&node->events_lock);
    if (!spinning) { /* a spinner sees the queue itself */
        (void)!write(node->event_fd, &one, sizeof(one));
    }
}

/* From a connection's first posted get until its kvx_fetch_wait, the progress thread stands by: the
 * waiting caller progresses the worker itself, and the two would otherwise take turns at its lock
 * for every reply that lands. Events queued meanwhile still signal the eventfd. */
static void hold_progress(kvx_node *node, int delta)
{
    pthread_mutex_lock(&node->events_lock);
    node->holding += delta;
    if (node->holding == 0) {
        pthread_cond_broadcast(&node->spin_done);
    }
    pthread_mutex_unlock(&node->events_lock);
}

static ucs_status_t on_message(void *arg, const void *header, size_t header_length, void *data, size_t length,
                               const ucp_am_recv_param_t *param)
{
    uint64_t tag = 0;
    if (header_length == sizeof(tag)) {
        memcpy(&tag, header, sizeof(tag));
    }
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
        return UCS_OK; /* messages are sent eager; a rendezvous one is not ours: drop it */
    }
    if (!place_header(arg, tag, data, length)) {
        push_event(arg, KVX_EVENT_MESSAGE, 0, tag, data, length);
    }
    return UCS_OK;
}

static void on_peer_failed(void *arg, ucp_ep_h ep, ucs_status_t status)
{
    kvx_peer *peer = arg;
    (void)ep;
    push_event(peer->node, KVX_EVENT_PEER_FAILED, status, peer->local_tag, NULL, 0);
}

static void *progress_loop(void *arg)
{
    kvx_node *node = arg;
    while (!node->stopping) {
        pthread_mutex_lock(&node->events_lock);
        while ((node->spinning || node->holding) && !node->stopping) {
            pthread_cond_wait(&node->spin_done, &node->events_lock);
        }
        pthread_mutex_unlock(&node->events_lock);
        if (ucp_worker_progress(node->worker) == 0) {
            double now = now_s(), due = acks_due(node, now);
            struct pollfd fd = {node->worker_fd, POLLIN, 0};
            if (now < node->spin_until) {
                continue; /* part of a routed request is in: its next header is due soon */
            }
            if (ucp_worker_arm(node->worker) == UCS_OK) {
                (void)poll(&fd, 1, due > 0 ? 1 + (int)((due - now) * 1000) : -1);
            }
        }
    }
    return NULL;
}

const char *kvx_status_string(int status) { return ucs_status_string((ucs_status_t)status); }

kvx_node *kvx_open(int *status_out)
{
    ucp_params_t params = {0};
    ucp_worker_params_t worker_params = {0};
    ucp_worker_attr_t attr = {0};
    ucp_am_handler_param_t handler = {0};
    ucp_config_t *config;
    ucs_status_t status;
    kvx_node *node = calloc(1, sizeof(*node));

    if (node == NULL) {
        *status_out = UCS_ERR_NO_MEMORY;
        return NULL;
    }
    node->event_fd = -1;
    pthread_mutex_init(&node->events_lock, NULL);
    pthread_mutex_init(&node->route_lock, NULL);
    pthread_cond_init(&node->spin_done, NULL);
    status = ucp_config_read(NULL, NULL, &config);
    if (status != UCS_OK) {
        goto fail;
    }
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    status = ucp_init(&params, config, &node->context);
    ucp_config_release(config);
    if (status != UCS_OK) {
        goto fail;
    }
    worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    worker_params.thread_mode = UCS_THREAD_MODE_MULTI;
    status = ucp_worker_create(node->context, &worker_params, &node->worker);
    if (status != UCS_OK) {
        goto fail;
    }
    attr.field_mask = UCP_WORKER_ATTR_FIELD_THREAD_MODE;
    status = ucp_worker_query(node->worker, &attr);
    if (status == UCS_OK && attr.thread_mode != UCS_THREAD_MODE_MULTI) {
        status = UCS_ERR_UNSUPPORTED;
    }
    if (status != UCS_OK) {
        goto fail;
    }
    handler.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                         UCP_AM_HANDLER_PARAM_FIELD_ARG;
    handler.id = KVX_AM_ID;
    handler.cb = on_message;
    handler.arg = node;
    status = ucp_worker_set_am_recv_handler(node->worker, &handler);
    if (status != UCS_OK) {
        goto fail;
    }
    status = ucp_worker_get_efd(node->worker, &node->worker_fd);
    if (status != UCS_OK) {
        goto fail;
    }
    node->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (node->event_fd < 0 || pthread_create(&node->progress_thread, NULL, progress_loop, node) != 0) {
        status = UCS_ERR_IO_ERROR;
        goto fail;
    }
    *status_out = UCS_OK;
    return node;
fail:
    if (node->event_fd >= 0) {
        close(node->event_fd);
    }
    if (node->worker) {
        ucp_worker_destroy(node->worker);
    }
    if (node->context) {
        ucp_cleanup(node->context);
    }
    free(node);
    *status_out = status;
    return NULL;
}

void kvx_close(kvx_node *node)
{
    kvx_event *ev;
    pthread_mutex_lock(&node->events_lock);
    node->stopping = 1;
    pthread_cond_broadcast(&node->spin_done);
    pthread_mutex_unlock(&node->events_lock);
    ucp_worker_signal(node->worker);
    pthread_join(node->progress_thread, NULL);
    while ((ev = node->head) != NULL) {
        node->head = ev->next;
        free(ev);
    }
    ucp_worker_destroy(node->worker);
    while (node->peers != NULL) {
        kvx_peer *next = node->peers->next;
        free(node->peers);
        node->peers = next;
    }
    ucp_cleanup(node->context);
    close(node->event_fd);
    free(node);
}

int kvx_event_fd(kvx_node *node) { return node->event_fd; }

/* The worker's address (what a peer passes to kvx_connect): its length, or minus the length
 * needed when `capacity` is too small. */
long kvx_address(kvx_node *node, void *out, size_t capacity)
{
    ucp_worker_attr_t attr = {0};
    long length;
    attr.field_mask = UCP_WORKER_ATTR_FIELD_ADDRESS;
    if (ucp_worker_query(node->worker, &attr) != UCS_OK) {
        return 0;
    }
    length = (long)attr.address_length;
    if ((size_t)length <= capacity) {
        memcpy(out, attr.address, length);
    } else {
        length = -length;
    }
    ucp_worker_release_address(node->worker, attr.address);
    return length;
}

/* Moves queued events into `out` as records [u32 type][i32 status][u64 tag][u32 length][data],
 * as many whole records as fit. Returns the bytes written (0: queue empty), or minus the size of
 * the first record when even that does not fit. */
long kvx_poll(kvx_node *node, void *out, size_t capacity)
{
    const size_t head_bytes = 20;
    char *p = out;
    size_t used = 0;
    kvx_event *ev;
    pthread_mutex_lock(&node->events_lock);
    while ((ev = node->head) != NULL) {
        size_t need = head_bytes + ev->length;
        if (used + need > capacity) {
            if (used == 0) {
                pthread_mutex_unlock(&node->events_lock);
                return -(long)need;
            }
            break;
        }
        memcpy(p + used, &ev->type, 4);
        memcpy(p + used + 4, &ev->status, 4);
        memcpy(p + used + 8, &ev->tag, 8);
        memcpy(p + used + 16, &ev->length, 4);
        memcpy(p + used + head_bytes, ev->data, ev->length);
        used += need;
        node->head = ev->next;
        if (node->head == NULL) {
            node->tail = NULL;
        }
        free(ev);
    }
    pthread_mutex_unlock(&node->events_lock);
    return (long)used;
}

kvx_conn *kvx_connect(kvx_node *node, const void *address, uint64_t tag, uint64_t local_tag, int *status_out)
{
    ucp_ep_params_t params = {0};
    ucs_status_t status;
    kvx_conn *conn = calloc(1, sizeof(*conn));
    kvx_peer *peer = calloc(1, sizeof(*peer));
    if (conn == NULL || peer == NULL) {
        free(conn);
        free(peer);
        *status_out = UCS_ERR_NO_MEMORY;
        return NULL;
    }
    peer->node = node;
    peer->local_tag = local_tag;
    pthread_mutex_lock(&node->events_lock);
    peer->next = node->peers;
    node->peers = peer;
    pthread_mutex_unlock(&node->events_lock);
    conn->node = node;
    conn->tag = tag;
    conn->local_tag = local_tag;
    pthread_mutex_init(&conn->lock, NULL);
    params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                        UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.address = address;
    params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
    params.err_handler.cb = on_peer_failed;
    params.err_handler.arg = peer;
    status = ucp_ep_create(node->worker, &params, &conn->ep);
    if (status != UCS_OK) {
        free(conn);
        *status_out = status;
        return NULL;
    }
    ucp_worker_signal(node->worker);
    *status_out = UCS_OK;
    return conn;
}

#define KVX_MAX_LANES 32
#define KVX_POST_PROGRESS 8 /* while posting gets, progress the worker after every this many */

/* Appends "transport device\n" for each of the endpoint's lanes (ucp_ep_query), which UCX picked
 * when the endpoint was created (its wire-up may still be under way). Returns the bytes written, or
 * minus the capacity needed; 0 for a closed connection or a failed query. */
long kvx_transports(kvx_conn *conn, char *out, size_t capacity)
{
    ucp_transport_entry_t entries[KVX_MAX_LANES];
    ucp_ep_attr_t attr = {0};
    ucs_status_t status = UCS_ERR_NOT_CONNECTED;
    size_t used = 0;
    attr.field_mask = UCP_EP_ATTR_FIELD_TRANSPORTS;
    attr.transports.entries = entries;
    attr.transports.num_entries = KVX_MAX_LANES;
    attr.transports.entry_size = sizeof(entries[0]);
    pthread_mutex_lock(&conn->lock);
    if (conn->ep != NULL) {
        status = ucp_ep_query(conn->ep, &attr);
    }
    for (unsigned i = 0; status == UCS_OK && i < attr.transports.num_entries; ++i) {
        /* the names live as long as the endpoint: copy them under the lock */
        int n = snprintf(used < capacity ? out + used : NULL, used < capacity ? capacity - used : 0, "%s %s\n",
                         entries[i].transport_name ? entries[i].transport_name : "?",
                         entries[i].device_name ? entries[i].device_name : "?");
        used += n > 0 ? (size_t)n : 0;
    }
    pthread_mutex_unlock(&conn->lock);
    return used < capacity ? (long)used : -(long)(used + 1);
}

static void wait_request(kvx_node *node, void *request)
{
    while (ucp_request_check_status(request) == UCS_INPROGRESS) {
        ucp_worker_progress(node->worker);
    }
    ucp_request_free(request);
}

/* Closes conn's endpoint at once: operations in flight on it complete with an error. Call with
 * conn->lock held. */
static void close_endpoint(kvx_conn *conn)
{
    ucp_request_param_t param = {0};
    void *request;
    param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_EP_CLOSE_FLAG_FORCE;
    request = ucp_ep_close_nbx(conn->ep, &param);
    conn->ep = NULL;
    if (request != NULL && !UCS_PTR_IS_ERR(request)) {
        wait_request(conn->node, request);
    }
}

/* Progresses until every get posted on conn so far has landed or failed (call with conn->lock held). */
static void drain_fetches(kvx_conn *conn)
{
    while (__atomic_load_n(&conn->fetches.pending, __ATOMIC_ACQUIRE) > 0) {
        ucp_worker_progress(conn->node->worker);
    }
}

/* Closes the endpoint and frees conn. With flush_timeout_s > 0, what was sent is first given that
 * long to go out (a peer that is gone cannot make it hang); then the endpoint is closed at once,
 * and operations still in flight complete with an error. */
void kvx_disconnect(kvx_conn *conn, double flush_timeout_s)
{
    ucp_request_param_t param = {0};
    void *request;
    pthread_mutex_lock(&conn->lock);
    if (conn->ep != NULL && flush_timeout_s > 0) {
        double deadline = now_s() + flush_timeout_s;
        request = ucp_ep_flush_nbx(conn->ep, &param);
        if (request != NULL && !UCS_PTR_IS_ERR(request)) {
            while (ucp_request_check_status(request) == UCS_INPROGRESS && now_s() < deadline) {
                ucp_worker_progress(conn->node->worker);
            }
            if (ucp_request_check_status(request) == UCS_INPROGRESS) {
                ucp_request_cancel(conn->node->worker, request);
            }
            ucp_request_free(request);
        }
    }
    if (conn->ep != NULL) {
        close_endpoint(conn);
    }
    drain_fetches(conn); /* gets still in flight report to conn: let them end before it goes */
    if (conn->fetches.holding) { /* posted, never waited for */
        hold_progress(conn->node, -1);
    }
    pthread_mutex_unlock(&conn->lock);
    pthread_mutex_destroy(&conn->lock);
    free(conn);
}

static void on_message_sent(void *request, ucs_status_t status, void *user_data)
{
    (void)status;
    free(user_data);
    ucp_request_free(request);
}

/* Posts `length` bytes as one message (copied, so the caller's buffer is free at once). Call with
 * conn->lock held and conn->ep set. */
static int post_message(kvx_conn *conn, const void *data, size_t length)
{
    ucp_request_param_t param = {0};
    void *copy = malloc(length ? length : 1), *request;
    if (copy == NULL) {
        return UCS_ERR_NO_MEMORY;
    }
    memcpy(copy, data, length);
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = UCP_AM_SEND_FLAG_EAGER | UCP_AM_SEND_FLAG_COPY_HEADER;
    param.cb.send = on_message_sent;
    param.user_data = copy;
    request = ucp_am_send_nbx(conn->ep, KVX_AM_ID, &conn->tag, sizeof(conn->tag), copy, length, &param);
    if (request == NULL) {
        free(copy);
        return UCS_OK;
    }
    if (UCS_PTR_IS_ERR(request)) {
        free(copy);
        return UCS_PTR_STATUS(request);
    }
    /* Not done at once (the peer's queue was full, or a protocol step is due): progress it here,
     * which is far sooner than waking the progress thread on a busy host; signal it otherwise. */
    for (int i = 0; i < 16 && ucp_worker_progress(conn->node->worker) != 0; ++i) {
    }
    ucp_worker_signal(conn->node->worker);
    return UCS_OK;
}

/* Over a transport without RMA of its own (tcp), UCX emulates a peer's gets with messages that this
 * side's worker answers: after each send on such a connection (a header the peer will read), the
 * progress thread polls for spin_s rather than sleeping, so those gets find it awake. */
void kvx_answer_gets(kvx_conn *conn, int on) { conn->answers_gets = on; }

/* Sends `length` bytes as one message; returns at once. */
int kvx_send(kvx_conn *conn, const void *data, size_t length)
{
    int status = UCS_ERR_NOT_CONNECTED;
    if (conn->answers_gets) {
        conn->node->spin_until = now_s() + conn->node->spin_s;
    }
    pthread_mutex_lock(&conn->lock);
    if (conn->ep != NULL) {
        status = post_message(conn, data, length);
    }
    pthread_mutex_unlock(&conn->lock);
    return status;
}

/* Copies `half` bytes from k, then from v, to destination (host memory), then sends the message
 * that announces them: one call per layer on the prefill side. */
int kvx_send_staged(kvx_conn *conn, uint64_t destination, uint64_t k, uint64_t v, size_t half, const void *data,
                    size_t length)
{
    memcpy((char *)(uintptr_t)destination, (const char *)(uintptr_t)k, half);
    memcpy((char *)(uintptr_t)(destination + half), (const char *)(uintptr_t)v, half);
    return kvx_send(conn, data, length);
}

void kvx_unregister(kvx_region *region)
{
    ucp_mem_unmap(region->node->context, region->memh);
    free(region);
}

static kvx_region *map_region(kvx_node *node, const ucp_mem_map_params_t *params, int *status_out)
{
    ucs_status_t status;
    kvx_region *region = calloc(1, sizeof(*region));
    if (region == NULL) {
        *status_out = UCS_ERR_NO_MEMORY;
        return NULL;
    }
    region->node = node;
    status = ucp_mem_map(node->context, params, &region->memh);
    if (status != UCS_OK) {
        free(region);
        region = NULL;
    }
    *status_out = status;
    return region;
}

kvx_region *kvx_register(kvx_node *node, void *address, size_t length, int *status_out)
{
    ucp_mem_map_params_t params = {0};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    params.address = address;
    params.length = length;
    return map_region(node, &params, status_out);
}

/* New memory of `length` bytes that UCX allocates itself, so that peers on this host can map it
 * (shared memory: sysv or posix, per UCX_ALLOC_PRIO); its address goes to *address_out. */
kvx_region *kvx_allocate(kvx_node *node, size_t length, uint64_t *address_out, int *status_out)
{
    ucp_mem_map_params_t params = {0};
    ucp_mem_attr_t attr = {0};
    kvx_region *region;
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    params.length = length;
    params.flags = UCP_MEM_MAP_ALLOCATE;
    region = map_region(node, &params, status_out);
    if (region == NULL) {
        return NULL;
    }
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS;
    *status_out = ucp_mem_query(region->memh, &attr);
    if (*status_out != UCS_OK) {
        kvx_unregister(region);
        return NULL;
    }
    *address_out = (uint64_t)(uintptr_t)attr.address;
    return region;
}

/* The packed rkey a peer needs to reach the region: its length, or minus the length needed. */
long kvx_region_rkey(kvx_region *region, void *out, size_t capacity)
{
    void *packed;
    size_t size;
    long length;
    if (ucp_rkey_pack(region->node->context, region->memh, &packed, &size) != UCS_OK) {
        return 0;
    }
    length = (long)size;
    if (size <= capacity) {
        memcpy(out, packed, size);
    } else {
        length = -length;
    }
    ucp_rkey_buffer_release(packed);
    return length;
}


/* A peer's packed rkey, unpacked for use with kvx_fetch on this connection (for shared memory
 * this maps the peer's segment, so unpack once and reuse). Destroy before the connection. */
kvx_rkey *kvx_unpack(kvx_conn *conn, const void *buffer, int *status_out)
{
    ucs_status_t status = UCS_ERR_NOT_CONNECTED;
    kvx_rkey *rkey = calloc(1, sizeof(*rkey));
    if (rkey == NULL) {
        *status_out = UCS_ERR_NO_MEMORY;
        return NULL;
    }
    pthread_mutex_lock(&conn->lock);
    if (conn->ep != NULL) {
        status = ucp_ep_rkey_unpack(conn->ep, buffer, &rkey->rkey);
    }
    pthread_mutex_unlock(&conn->lock);
    if (status != UCS_OK) {
        free(rkey);
        rkey = NULL;
    }
    *status_out = status;
    return rkey;
}

/* Where the peer's address `remote` is mapped in this process (shared memory), or 0 if it is not. */
uint64_t kvx_rkey_ptr(kvx_rkey *rkey, uint64_t remote)
{
    void *local = NULL;
    if (ucp_rkey_ptr(rkey->rkey, remote, &local) != UCS_OK) {
        return 0;
    }
    return (uint64_t)(uintptr_t)local;
}

/* Maps every page of [address, address + length) into this process now, so that copies out of a
 * peer's region take no page fault on first touch. 0, or the errno of a range it could not map. */
int kvx_prefault(uint64_t address, size_t length)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)address & ~(page - 1);
    uintptr_t end = (uintptr_t)address + length;
#ifdef MADV_POPULATE_READ
    if (madvise((void *)start, end - start, MADV_POPULATE_READ) == 0) {
        return 0;
    }
    if (errno != EINVAL) {
        return errno;
    }
#endif
    for (uintptr_t p = start; p < end; p += page) { /* kernels before 5.14: touch each page */
        (void)*(volatile const char *)p;
    }
    return 0;
}

/* 1 when all of [address, address + length) lies in one mapping of one shared object in this process, and
 * within that object's size; 0 when `address` is in such a mapping but the range runs past it; -1 when
 * `address` is in no shared object's mapping (private or anonymous memory, or none). A peer's region is only
 * copied out of (here, or by UCX's shared-memory gets) once its claimed size is known to be its own: being
 * mapped is not enough, since whatever the kernel placed next to the mapping (libraries, heaps, another
 * segment) is mapped too. A mapping may span several entries of /proc/self/maps: they must follow each other
 * in memory and in the same object's offsets. */
int kvx_shared_mapping(uint64_t address, size_t length)
{
    uint64_t end = address + length;
    FILE *maps = fopen("/proc/self/maps", "re");
    if (maps == NULL) {
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    int found = 0, inside = 0;
    unsigned long first_start = 0, first_end = 0, first_offset = 0, next = 0, next_offset = 0, ino = 0;
    unsigned int major = 0, minor = 0;
    while (!inside && getline(&line, &cap, maps) > 0) {
        unsigned long start, stop, offset, i;
        unsigned int ma, mi;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu", &start, &stop, perms, &offset, &ma, &mi, &i) != 7) {
            break;
        }
        if (!found) {
            if (address < start || address >= stop) {
                continue;
            }
            if (i == 0 || perms[3] != 's') {
                break; /* anonymous or private: not a peer's shared memory */
            }
            found = 1;
            first_start = start, first_end = stop, first_offset = offset;
            major = ma, minor = mi, ino = i;
        } else if (start != next || ma != major || mi != minor || i != ino || offset != next_offset) {
            break;
        }
        next = stop;
        next_offset = offset + (stop - start);
        inside = end <= next;
    }
    free(line);
    fclose(maps);
    if (!found) {
        return -1;
    }
    if (!inside || length == 0 || end < address) {
        return 0;
    }
    /* A mapping longer than its object faults past the object's end: check the size where the kernel shows it. */
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/self/map_files/%lx-%lx", first_start, first_end);
    if (stat(path, &st) == 0 && first_offset + (end - first_start) > (uint64_t)st.st_size) {
        return 0;
    }
    return 1;
}

/* 1 when every page of [address, address + length) is mapped in this process (any mapping), else 0. */
int kvx_pages_mapped(uint64_t address, size_t length)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)address & ~(page - 1);
    if (length == 0 || address + length < address) {
        return 0;
    }
    return msync((void *)start, (uintptr_t)address + length - start, MS_ASYNC) == 0;
}

void kvx_rkey_destroy(kvx_rkey *rkey)
{
    ucp_rkey_destroy(rkey->rkey);
    free(rkey);
}

/* memcpy with non-temporal stores: the KV cache blocks a transfer fills are rarely in any cache,
 * and streaming stores skip reading each destination line first. Measured here for 64 KiB pieces
 * at random places in 256 MiB: 13-15 GB/s against 9-11 GB/s for memcpy (which is faster for data
 * already in cache, 57 against 28 GB/s, but KV arriving for a new request is not). */
void copy_streaming(char *dst, const char *src, size_t n)
{
#if defined(__x86_64__)
    size_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (n < 256 + head) {
        memcpy(dst, src, n);
        return;
    }
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    for (; n >= 64; dst += 64, src += 64, n -= 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)src);
        __m128i b = _mm_loadu_si128((const __m128i *)(src + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + 48));
        _mm_stream_si128((__m128i *)dst, a);
        _mm_stream_si128((__m128i *)(dst + 16), b);
        _mm_stream_si128((__m128i *)(dst + 32), c);
        _mm_stream_si128((__m128i *)(dst + 48), d);
    }
#endif
    memcpy(dst, src, n);
}

/* The pieces of K and of V (two source bases, two local bases, the same offsets) out of a peer
 * region mapped into this process (kvx_rkey_ptr): a plain copy, no UCX request. */
void kvx_copy_kv(uint64_t k_source, uint64_t v_source, uint64_t k_local, uint64_t v_local, size_t n,
                 const uint64_t *source_offsets, const uint64_t *local_offsets, const uint64_t *lengths)
{
    size_t i;
    for (i = 0; i < n; ++i) {
        copy_streaming((char *)(uintptr_t)(k_local + local_offsets[i]),
                       (const char *)(uintptr_t)(k_source + source_offsets[i]), lengths[i]);
    }
    for (i = 0; i < n; ++i) {
        copy_streaming((char *)(uintptr_t)(v_local + local_offsets[i]),
                       (const char *)(uintptr_t)(v_source + source_offsets[i]), lengths[i]);
    }
#if defined(__x86_64__)
    _mm_sfence(); /* the streamed stores are visible before whoever is told the KV is in place */
#endif
}

static void on_fetched(void *request, ucs_status_t status, void *user_data)
{
    kvx_batch *batch = user_data;
    if (status != UCS_OK && batch->status == UCS_OK) {
        batch->status = status;
    }
    __atomic_sub_fetch(&batch->pending, 1, __ATOMIC_ACQ_REL);
    ucp_request_free(request);
}

/* Posts gets of n pieces from the peer's region (remote_key) into local memory: piece i is lengths[i]
 * bytes from remote_base + remote_offsets[i] to local_base + local_offsets[i]. Returns at once (the
 * arrays may go; the memory may not): kvx_fetch_wait waits for every get posted on the connection.
 * Gets in flight together are what keeps a network transport busy: over tcp, each is a round trip
 * to the peer's worker. */
int kvx_fetch_post(kvx_conn *conn, kvx_rkey *remote_key, uint64_t remote_base, uint64_t local_base, size_t n,
                   const uint64_t *remote_offsets, const uint64_t *local_offsets, const uint64_t *lengths)
{
    ucp_request_param_t param = {0};
    kvx_batch *batch = &conn->fetches;
    int status = UCS_OK;
    pthread_mutex_lock(&conn->lock);
    if (conn->ep == NULL) {
        pthread_mutex_unlock(&conn->lock);
        return UCS_ERR_NOT_CONNECTED;
    }
    if (!batch->holding) {
        batch->holding = 1;
        hold_progress(conn->node, 1);
    }
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = on_fetched;
    param.user_data = batch;
    for (size_t i = 0; i < n && status == UCS_OK; ++i) {
        void *request;
        __atomic_add_fetch(&batch->pending, 1, __ATOMIC_ACQ_REL);
        request = ucp_get_nbx(conn->ep, (void *)(uintptr_t)(local_base + local_offsets[i]), lengths[i],
                              remote_base + remote_offsets[i], remote_key->rkey, &param);
        if (request == NULL || UCS_PTR_IS_ERR(request)) {
            if (UCS_PTR_IS_ERR(request)) {
                status = UCS_PTR_STATUS(request);
            }
            __atomic_sub_fetch(&batch->pending, 1, __ATOMIC_ACQ_REL);
        }
        if (i % KVX_POST_PROGRESS == KVX_POST_PROGRESS - 1) {
            ucp_worker_progress(conn->node->worker); /* take in the replies so far, so that more can come */
        }
    }
    pthread_mutex_unlock(&conn->lock);
    return status;
}

/* Waits for every get posted on the connection: UCS_OK when all landed, else the first failure. Past
 * `timeout_s` the endpoint is closed, which ends every get, and UCS_ERR_TIMED_OUT is returned; the
 * connection is then unusable. */
int kvx_fetch_wait(kvx_conn *conn, double timeout_s)
{
    kvx_batch *batch = &conn->fetches;
    double deadline = now_s() + timeout_s;
    int idle = 0, status;
    pthread_mutex_lock(&conn->lock);
    while (__atomic_load_n(&batch->pending, __ATOMIC_ACQUIRE) > 0) {
        if (ucp_worker_progress(conn->node->worker) != 0) {
            idle = 0;
        } else if (++idle % 64 == 0 && now_s() > deadline) {
            close_endpoint(conn);
            drain_fetches(conn);
            batch->status = UCS_ERR_TIMED_OUT;
            break;
        }
    }
    status = batch->status;
    batch->status = UCS_OK;
    if (batch->holding) {
        batch->holding = 0;
        hold_progress(conn->node, -1);
    }
    pthread_mutex_unlock(&conn->lock);
    return status;
}

/* kvx_fetch_post, then kvx_fetch_wait. */
int kvx_fetch(kvx_conn *conn, kvx_rkey *remote_key, uint64_t remote_base, uint64_t local_base, size_t n,
              const uint64_t *remote_offsets, const uint64_t *local_offsets, const uint64_t *lengths,
              double timeout_s)
{
    int posted = kvx_fetch_post(conn, remote_key, remote_base, local_base, n, remote_offsets, local_offsets,
                                lengths);
    int waited = kvx_fetch_wait(conn, timeout_s);
    return posted != UCS_OK ? posted : waited;
}

/* Progresses the worker in the calling thread until an event is queued (returns 1) or timeout_s
 * passes (returns 0). From the first call until kvx_spin_end, the progress thread stands by and
 * the worker stays unarmed, so peers send without waking anyone: for bursts of messages a few
 * microseconds apart. */
int kvx_spin(kvx_node *node, double timeout_s)
{
    double deadline = now_s() + timeout_s;
    int idle = 0;
    pthread_mutex_lock(&node->events_lock);
    node->spinning = 1;
    pthread_mutex_unlock(&node->events_lock);
    for (;;) {
        if (ucp_worker_progress(node->worker) != 0) {
            idle = 0;
        }
        if (__atomic_load_n(&node->head, __ATOMIC_ACQUIRE) != NULL) {
            return 1;
        }
        if (++idle % 16 == 0 && now_s() > deadline) {
            return 0;
        }
    }
}

/* Hands progress back to the progress thread (events queued meanwhile signal the eventfd). */
void kvx_spin_end(kvx_node *node)
{
    uint64_t one = 1;
    pthread_mutex_lock(&node->events_lock);
    node->spinning = 0;
    if (node->head != NULL) {
        (void)!write(node->event_fd, &one, sizeof(one));
    }
    pthread_cond_broadcast(&node->spin_done);
    pthread_mutex_unlock(&node->events_lock);
}
