/* release_queue.c: release threads that hold datagrams and send each at its
 * deadline, without the Python GIL. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "jasper_mp.h"

#define ADDR_MAX 112
/* (endpoint, stream) pairs whose next seq the MP framing tracks per queue (gap-before); pairs
 * beyond it are never flagged. */
#define GAP_SLOTS 4096
/* Warm the send path only when this much time is left before a deadline: a cold first
 * sendto after a sleep costs 30-45 us, a warm one 3 us (measured on loopback). */
#define WARM_LEAD_NS 50000
/* A batch takes every datagram due within this much of the earliest, and each still goes out
 * at or after its own deadline: deadlines a few ns apart (one message's copies after a node
 * clock's conversion to the kernel's, messages stamped close together) then share one wake-up
 * instead of a timer each (measured at 1000 endpoints: one batch per datagram without it). */
#define BATCH_WINDOW_NS 20000

struct held {
    int64_t deadline;      /* CLOCK_REALTIME ns */
    uint64_t stream, seq, rank, token;
    int fd;
    socklen_t addr_len;
    unsigned char addr[ADDR_MAX];
    int len;
    /* MP framing (jasper_mp.h): the payload is a delivery datagram whose headers get the
     * release time (kernel clock + offset, the node clock) and gap-before when sent. */
    int mp;
    uint32_t endpoint, session, count;
    int64_t offset;
    unsigned char payload[];
};

struct gap_slot {
    uint64_t key;          /* endpoint << 32 | stream, + 1 (0: empty) */
    uint64_t next;         /* next seq expected */
    uint32_t session;
};

struct done {
    uint64_t token;
    int64_t stamp;         /* CLOCK_REALTIME ns when sendto returned */
    int err;               /* errno, 0 when sent */
    uint32_t gap;          /* MP framing: sequence numbers skipped before it (0: none) */
};

struct queue {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    struct held **heap;    /* min-heap on (deadline, stream, seq, rank) */
    int n, cap;
    struct done *ring;     /* completions, drained by the caller */
    int ring_head, ring_len;
    int64_t spin_ns;
    int notify_fd;         /* an eventfd written after each batch (-1: none) */
    int priority;          /* SCHED_FIFO priority (0: normal scheduling) */
    int cpu;               /* the CPU the thread runs on (-1: wherever the kernel puts it) */
    int realtime_ok;
    int stopping, drain, halt;
    uint64_t pushed, sent, failed, overflow, batches;
    struct held **batch;   /* the batch being sent */
    struct done *done;     /* its completions */
    int warm_fd;           /* a private loopback socket the threads send to before a batch */
    struct sockaddr_in warm_addr;
    struct gap_slot *gaps; /* GAP_SLOTS, touched by the release thread only (and stop) */
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int before(const struct held *a, const struct held *b)
{
    if (a->deadline != b->deadline) return a->deadline < b->deadline;
    if (a->stream != b->stream) return a->stream < b->stream;
    if (a->seq != b->seq) return a->seq < b->seq;
    return a->rank < b->rank;
}

static void sift_up(struct queue *q, int i)
{
    struct held *x = q->heap[i];
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!before(x, q->heap[p])) break;
        q->heap[i] = q->heap[p];
        i = p;
    }
    q->heap[i] = x;
}

static struct held *pop_min(struct queue *q)
{
    struct held *top = q->heap[0];
    struct held *x = q->heap[--q->n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= q->n) break;
        if (c + 1 < q->n && before(q->heap[c + 1], q->heap[c])) c++;
        if (!before(q->heap[c], x)) break;
        q->heap[i] = q->heap[c];
        i = c;
    }
    if (q->n > 0) q->heap[i] = x;
    return top;
}

static void realtime(struct queue *q, int *ok)
{
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    if (q->cpu >= 0) {
        /* Threads sharing a deadline's batch each on a CPU of their own: two SCHED_FIFO
         * threads on one CPU would send one after the other. */
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(q->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    }
    if (q->priority > 0) {
        struct sched_param sp = { .sched_priority = q->priority };
        *ok = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0;
    }
}

/* Spin to the deadline, first running the send path once if there is time for it. */
static void wait_until(struct queue *q, int64_t deadline)
{
    if (q->warm_fd >= 0 && deadline - now_ns() > WARM_LEAD_NS) {
        char b[16] = { 0 };
        ssize_t rc = sendto(q->warm_fd, b, sizeof b, MSG_DONTWAIT,
                    (const struct sockaddr *)&q->warm_addr, sizeof q->warm_addr);
        while (rc >= 0 && recv(q->warm_fd, b, sizeof b, MSG_DONTWAIT) > 0)
            ;
    }
    while (now_ns() < deadline)
        ;
}

/* jasper.mp_spec.GapTracker for one release: the messages skipped before it. */
static uint32_t gap_check(struct queue *q, const struct held *h)
{
    uint64_t key = ((uint64_t)h->endpoint << 32 | (h->stream & 0xFFFFFFFFu)) + 1;
    uint64_t end = h->seq + h->count;
    for (uint32_t i = 0; i < GAP_SLOTS; i++) {
        struct gap_slot *g = &q->gaps[((key * 0x9E3779B97F4A7C15ULL >> 52) + i) & (GAP_SLOTS - 1)];
        if (g->key == 0 || (g->key == key && g->session != h->session)) {
            g->key = key;
            g->session = h->session;
            g->next = end;
            return 0;
        }
        if (g->key != key)
            continue;
        uint64_t skipped = h->seq > g->next ? h->seq - g->next : 0;
        if (end > g->next) g->next = end;
        return skipped > UINT32_MAX ? UINT32_MAX : (uint32_t)skipped;
    }
    return 0;
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (unsigned char)v;
}

/* Release time and gap-before into every header of a framed delivery. */
static uint32_t stamp_mp(struct queue *q, struct held *h)
{
    uint32_t gap = gap_check(q, h);
    uint64_t release = (uint64_t)(now_ns() + h->offset);
    size_t at = 0, len = (size_t)h->len;
    for (uint32_t i = 0; i < h->count && at + JASPER_MP_HEADER_LEN <= len; i++) {
        unsigned char *p = h->payload + at;
        put64(p + __builtin_offsetof(struct jasper_mp_hdr, release_ns), release);
        if (i == 0 && gap) p[__builtin_offsetof(struct jasper_mp_hdr, flags)] |=
                JASPER_MP_FLAG_GAP_BEFORE;
        const unsigned char *l = p + __builtin_offsetof(struct jasper_mp_hdr, length);
        at += JASPER_MP_HEADER_LEN + ((size_t)l[0] << 8 | l[1]);
    }
    return gap;
}

/* Send in order (fd < 0: stamp only); with on_time, none before its own deadline. */
static void send_all(struct queue *q, struct held **items, struct done *out, int m, int on_time)
{
    for (int i = 0; i < m; i++) {
        struct held *h = items[i];
        while (on_time && now_ns() < h->deadline)
            ;
        out[i].gap = h->mp ? stamp_mp(q, h) : 0;
        ssize_t rc = h->fd < 0 ? 0 : sendto(h->fd, h->payload, (size_t)h->len, MSG_DONTWAIT,
                    (const struct sockaddr *)h->addr, h->addr_len);
        out[i].stamp = now_ns();
        out[i].err = rc < 0 ? errno : 0;
        out[i].token = h->token;
    }
}

/* Completions into the ring (the caller takes them), entries freed, the loop woken. */
static void book(struct queue *q, struct held **items, struct done *out, int m)
{
    pthread_mutex_lock(&q->mu);
    for (int j = 0; j < m; j++) {
        q->ring[(q->ring_head + q->ring_len) % q->cap] = out[j];
        q->ring_len++;
        if (out[j].err) q->failed++; else q->sent++;
    }
    pthread_mutex_unlock(&q->mu);
    for (int i = 0; i < m; i++) free(items[i]);
    if (q->notify_fd >= 0 && m > 0) {
        uint64_t one = 1;
        ssize_t rc = write(q->notify_fd, &one, sizeof one);
        (void)rc;
    }
}

static void *run(void *arg)
{
    struct queue *q = arg;
    realtime(q, &q->realtime_ok);
    pthread_mutex_lock(&q->mu);
    for (;;) {
        while (q->n == 0 && !q->stopping)
            pthread_cond_wait(&q->cv, &q->mu);
        if (q->halt || (q->stopping && (q->n == 0 || !q->drain)))
            break;
        int64_t deadline = q->heap[0]->deadline;
        int64_t wake = deadline - q->spin_ns;
        if (wake > now_ns()) {
            /* A push of an earlier deadline or a stop signals the condition and ends this. */
            struct timespec ts = { .tv_sec = wake / 1000000000LL, .tv_nsec = wake % 1000000000LL };
            pthread_cond_timedwait(&q->cv, &q->mu, &ts);
            continue;
        }
        struct held **batch = q->batch;
        int64_t last = deadline + BATCH_WINDOW_NS;
        int m = 0;
        while (q->n > 0 && q->heap[0]->deadline <= last)
            batch[m++] = pop_min(q);
        q->batches++;
        pthread_mutex_unlock(&q->mu);
        wait_until(q, deadline);
        send_all(q, batch, q->done, m, 1);
        /* Copies pushed during the spin for this batch's window go right after. */
        pthread_mutex_lock(&q->mu);
        int late = 0;
        while (q->n > 0 && q->heap[0]->deadline <= last)
            batch[m + late++] = pop_min(q);
        pthread_mutex_unlock(&q->mu);
        send_all(q, batch + m, q->done + m, late, 1);
        book(q, batch, q->done, m + late);
        pthread_mutex_lock(&q->mu);
    }
    pthread_mutex_unlock(&q->mu);
    return NULL;
}

static void release_memory(struct queue *q)
{
    if (q->warm_fd >= 0) close(q->warm_fd);
    free(q->heap); free(q->ring); free(q->batch); free(q->done); free(q->gaps); free(q);
}

void *jasper_rq_create(int cap, int64_t spin_ns, int priority, int notify_fd, int cpu)
{
    struct queue *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->warm_fd = -1;
    q->heap = calloc((size_t)cap, sizeof *q->heap);
    q->ring = calloc((size_t)cap, sizeof *q->ring);
    q->batch = calloc((size_t)cap, sizeof *q->batch);
    q->done = calloc((size_t)cap, sizeof *q->done);
    q->gaps = calloc(GAP_SLOTS, sizeof *q->gaps);
    if (!q->heap || !q->ring || !q->batch || !q->done || !q->gaps) { release_memory(q); return NULL; }
    q->cap = cap;
    q->spin_ns = spin_ns;
    q->priority = priority;
    q->notify_fd = notify_fd;
    q->cpu = cpu;
    q->warm_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (q->warm_fd >= 0) {
        socklen_t len = sizeof q->warm_addr;
        q->warm_addr.sin_family = AF_INET;
        q->warm_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(q->warm_fd, (struct sockaddr *)&q->warm_addr, sizeof q->warm_addr) != 0 ||
            getsockname(q->warm_fd, (struct sockaddr *)&q->warm_addr, &len) != 0) {
            close(q->warm_fd);
            q->warm_fd = -1;  /* no warming, e.g. in a namespace without loopback up */
        }
    }
    /* Priority inheritance: the event loop (ordinary scheduling) pushes under this lock, and
     * a real-time release thread must not wait for the loop to be scheduled again to take it. */
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setprotocol(&ma, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&q->mu, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_cond_init(&q->cv, NULL);  /* timed waits on CLOCK_REALTIME, as the deadlines */
    if (pthread_create(&q->thread, NULL, run, q) != 0) {
        release_memory(q);
        return NULL;
    }
    return q;
}

/* Hold one datagram until deadline_ns (CLOCK_REALTIME). 0 when held, -1 when the queue (held
 * plus completions not yet taken) is full, -2 when stopping or the arguments are bad. With mp,
 * the payload is an MP delivery of `count` messages (jasper_mp.h) of endpoint `endpoint`:
 * sending writes the release time (CLOCK_REALTIME + offset) and gap-before into it. */
int jasper_rq_push(void *handle, int64_t deadline_ns, uint64_t stream, uint64_t seq,
           uint64_t rank, uint64_t token, int fd, const unsigned char *addr, int addr_len,
           const unsigned char *payload, int len, int mp, uint32_t endpoint, uint32_t session,
           uint32_t count, int64_t offset)
{
    struct queue *q = handle;
    if (addr_len < 0 || addr_len > ADDR_MAX || len < 0) return -2;
    struct held *h = malloc(sizeof *h + (size_t)len);
    if (!h) return -1;
    h->deadline = deadline_ns; h->stream = stream; h->seq = seq; h->rank = rank;
    h->token = token; h->fd = fd; h->addr_len = (socklen_t)addr_len; h->len = len;
    h->mp = mp; h->endpoint = endpoint; h->session = session; h->count = count;
    h->offset = offset;
    memcpy(h->addr, addr, (size_t)addr_len);
    memcpy(h->payload, payload, (size_t)len);
    pthread_mutex_lock(&q->mu);
    if (q->stopping) { pthread_mutex_unlock(&q->mu); free(h); return -2; }
    if (q->n + q->ring_len >= q->cap) {
        q->overflow++;
        pthread_mutex_unlock(&q->mu);
        free(h);
        return -1;
    }
    int earliest = q->n == 0 || before(h, q->heap[0]);
    q->heap[q->n++] = h;
    sift_up(q, q->n - 1);
    q->pushed++;
    if (earliest) pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    return 0;
}

/* Move up to max completions out: tokens, send stamps, errnos, gaps (sequence numbers skipped
 * before an MP delivery). Returns how many. */
int jasper_rq_take(void *handle, uint64_t *tokens, int64_t *stamps, int *errs, uint32_t *gaps,
                   int max)
{
    struct queue *q = handle;
    pthread_mutex_lock(&q->mu);
    int k = 0;
    while (k < max && q->ring_len > 0) {
        struct done *d = &q->ring[q->ring_head];
        tokens[k] = d->token; stamps[k] = d->stamp; errs[k] = d->err; gaps[k] = d->gap;
        q->ring_head = (q->ring_head + 1) % q->cap;
        q->ring_len--;
        k++;
    }
    pthread_mutex_unlock(&q->mu);
    return k;
}

/* Counters: held, pushed, sent, failed, overflow, batches, realtime_ok. */
void jasper_rq_counters(void *handle, uint64_t *out)
{
    struct queue *q = handle;
    pthread_mutex_lock(&q->mu);
    out[0] = (uint64_t)q->n; out[1] = q->pushed; out[2] = q->sent; out[3] = q->failed;
    out[4] = q->overflow; out[5] = q->batches; out[6] = (uint64_t)q->realtime_ok;
    pthread_mutex_unlock(&q->mu);
}

/* Stop the thread. With drain it keeps releasing on time until nothing is
 * held, for up to timeout_ns; what is still held then is sent at once. Without drain held
 * datagrams are dropped. Returns how many were dropped. Call once. */
int jasper_rq_stop(void *handle, int drain, int64_t timeout_ns)
{
    struct queue *q = handle;
    pthread_mutex_lock(&q->mu);
    q->stopping = 1;
    q->drain = drain;
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
    int64_t until = now_ns() + timeout_ns;
    struct timespec ts = { .tv_sec = until / 1000000000LL, .tv_nsec = until % 1000000000LL };
    if (pthread_timedjoin_np(q->thread, NULL, &ts) != 0) {
        pthread_mutex_lock(&q->mu);
        q->halt = 1;
        pthread_cond_signal(&q->cv);
        pthread_mutex_unlock(&q->mu);
        pthread_join(q->thread, NULL);
    }
    int dropped = 0;
    pthread_mutex_lock(&q->mu);
    int m = 0;
    while (q->n > 0) {
        struct held *h = pop_min(q);
        if (drain) q->batch[m++] = h; else { free(h); dropped++; }
    }
    pthread_mutex_unlock(&q->mu);
    send_all(q, q->batch, q->done, m, 0);
    book(q, q->batch, q->done, m);
    return dropped;
}

void jasper_rq_free(void *handle)
{
    struct queue *q = handle;
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    release_memory(q);
}

/* A CPython extension module in name only: the package build compiles this file with the other
 * native code (setup.py), and overlay/releasec.py loads the functions above through ctypes.
 * Nothing is compiled at run time. */
#include <Python.h>

static struct PyModuleDef release_queue_module = {
    PyModuleDef_HEAD_INIT, "overlay._releasequeue",
    "C release threads (loaded by overlay/releasec.py through ctypes).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__releasequeue(void)
{
    return PyModule_Create(&release_queue_module);
}
