/*
 * What kvx.c (the node: messages, memory, fetch, spin) and kvx_route.c (routes) share.
 */
#ifndef KVX_H
#define KVX_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include <ucp/api/ucp.h>

#define KVX_INTERNAL __attribute__((visibility("hidden"))) /* shared by the two files, not exported */

enum { KVX_EVENT_MESSAGE = 1, KVX_EVENT_PEER_FAILED = 2, KVX_EVENT_ROUTE_DONE = 3, KVX_EVENT_ACKS_DUE = 4 };

typedef struct kvx_event {
    struct kvx_event *next;
    uint32_t type;
    int32_t status;
    uint64_t tag;
    uint32_t length;
    char data[];
} kvx_event;

typedef struct kvx_source kvx_source;

/* What a connection's failure is reported as: UCX may call the error handler after the connection is gone, so
 * its argument is this record, which lives as long as the node (one per connection ever made). */
typedef struct kvx_peer {
    struct kvx_node *node;
    uint64_t local_tag;
    struct kvx_peer *next;
} kvx_peer;

typedef struct kvx_node {
    ucp_context_h context;
    ucp_worker_h worker;
    int worker_fd;         /* readable when the armed worker has something to progress */
    pthread_t progress_thread;
    volatile int stopping;
    int spinning;          /* a caller of kvx_spin progresses the worker: the progress thread stands by */
    int holding;           /* callers waiting for their gets progress the worker: the progress thread stands by */
    pthread_cond_t spin_done;
    int event_fd;
    pthread_mutex_t events_lock;
    kvx_event *head, *tail;
    pthread_mutex_t route_lock; /* sinks' sources and routes; held while a routed header is placed */
    kvx_source *sources;
    kvx_peer *peers;       /* under events_lock */
    double spin_s;         /* after placing part of a request, poll this long for the rest */
    volatile double spin_until;
} kvx_node;

KVX_INTERNAL double now_s(void);
/* Queues an event and makes the eventfd readable (unless a caller of kvx_spin polls the queue). */
KVX_INTERNAL void push_event(kvx_node *node, uint32_t type, int32_t status, uint64_t tag, const void *data,
                             size_t length);
KVX_INTERNAL void copy_streaming(char *dst, const char *src, size_t n);

/* kvx_route.c: from the message callback, 1 when the header was placed (0: queue it as a message) */
KVX_INTERNAL int place_header(kvx_node *node, uint64_t tag, const void *data, size_t length);
/* kvx_route.c: reports the sources whose acks are due; returns when the next will be (0: none) */
KVX_INTERNAL double acks_due(kvx_node *node, double now);

#endif
