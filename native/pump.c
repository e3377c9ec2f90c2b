/* pump.c: overlay._datapath, the native receive pump: recvmmsg, link-delay sampling, the receiver
 * core (receiver_core.c, compiled in) and release sends, on a thread of its own without the GIL. */
/*
 * One pthread per ReceivePump. It waits in epoll on the endpoints' UDP sockets and a wake
 * eventfd, receives in batches (recvmmsg, BATCH slots of SLOT_BYTES), takes the kernel receive
 * time (SO_TIMESTAMPNS) and drop count (SO_RXQ_OVFL), maps the source to a parent id, samples an
 * emulated link delay (optional), feeds jc_datagram and hands every release over: sendto the
 * endpoint's delivery socket, or a bounded queue Python pulls (take_deliveries, notify_fd). Every
 * release also leaves one fixed-size record in a bounded buffer (take_records).
 *
 * Locking: one mutex (priority inheritance) guards everything below the Python object header.
 * The pump thread holds it while it processes and drops it while it sleeps in epoll; Python
 * methods take it with the GIL held (the pump thread never takes the GIL, so that cannot
 * deadlock) and write the wake eventfd when the thread should look again.
 *
 * Timing follows overlay/releasec.py (the C release thread this replaces): timer slack 1 ns,
 * sleep until a lead before the next held deadline, then spin on the clock; optional SCHED_FIFO
 * and a CPU pin, both fail soft. The lead adapts to the oversleep this host shows (a VM's timer
 * wake-ups come 25-40 us late, p99 ~100 us): about its 95th percentile plus 5 us, at most
 * spin_ns, so a deadline costs a spin of about the oversleep's spread, not a fixed spin_ns.
 *
 * Receive coalescing: woken by data after a sleep, the thread waits coalesce_ns (never past a
 * deadline's lead point) before it receives, so a burst of copies from many parents is taken
 * in one round instead of one wake-up per datagram. SO_TIMESTAMPNS keeps every arrival exact:
 * only the processing waits. Copies are fed to the core at its current time and processed by
 * the next advance, in emulated-arrival order (receive_batch). During a deadline's spin the
 * thread receives at once, and a round that reaches the deadline stops and resumes after it. The core only tells the earliest of its next pending arrival and
 * next held deadline, and a pending arrival needs no spin (processing a copy a little after its
 * emulated arrival never changes which copy wins: every later copy arrives later still), so the
 * pump keeps its own min-heap of candidate deadlines: the header deadline of every valid copy
 * fed while it lies in the future and that may pass authentication (jc_may_admit: stream,
 * key epoch and session; the MAC is checked once, by the core), so a forger cannot schedule
 * spins. Every held entry's deadline in force is one of them (a clamped deadline is an earlier
 * held one's; a copy of a stream set between its receipt and its processing is the exception,
 * released at the next tick without a spin), so spinning toward the heap's minimum never misses
 * a release; a duplicate's deadline only costs a spin that finds nothing.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "jasper_mp.h"
#include "jasper_wire.h"
#include "receiver_core.h"

#define MAX_DATAGRAM (JASPER_HEADER_LEN + JASPER_MAX_PAYLOAD)
/* Datagrams per recvmmsg call. */
#define BATCH 64
/* One byte more than the longest valid datagram: a longer one fills the slot (and the kernel
 * flags MSG_TRUNC when it was longer still), so the core counts it malformed "length". */
#define SLOT_BYTES (MAX_DATAGRAM + 1)
#define CMSG_BYTES 128
#define MAX_EVENTS 64
#define WAKE_TAG UINT32_C(0xFFFFFFFF)
#define WAKE_SEEN UINT32_C(0xFFFFFFFD) /* a wake event already read */
#define UNKNOWN_PARENT UINT32_C(0xFFFFFFFE)
/* Warm the send path (once per deadline) only when at least this much time is left before it:
 * a cold first sendto after a sleep costs 30-45 us, a warm one 3 us (overlay/releasec.py). */
#define WARM_MIN_NS 8000
/* The adaptive lead: the second largest of the last LEAD_SAMPLES oversleeps (about their 95th
 * percentile) plus LEAD_GUARD_NS, at least LEAD_MIN_NS, at most spin_ns. */
#define LEAD_SAMPLES 32
#define LEAD_GUARD_NS 5000
#define LEAD_MIN_NS 5000
/* A deferred receive round polls epoll at most this many times beyond one per MAX_EVENTS. */
#define ROUND_EXTRA_POLLS 2
/* Default receive coalescing window (chosen by bench/rate.py case a, see the commit). */
#define DEFAULT_COALESCE_NS 200000
/* Distinct errnos counted per endpoint; further ones count under "other". */
#define ERRNO_SLOTS 8
/* Links (parent, endpoint) with a generator of their own; further links share one. */
#define MAX_LINKS (1u << 16)
/* On stop with drain, recvmmsg batches taken per endpoint from what the kernel still queues. */
#define DRAIN_BATCHES 1024
#define NS 1000000000LL

/* ---- the record: one per release --------------------------------------------------------- */

/* Little-endian, packed, no padding: numpy dtype RECORD_FIELDS, struct format RECORD_FORMAT. */
struct pump_record {
	uint32_t endpoint;
	uint32_t parent;
	uint32_t stream_id;
	uint32_t session;
	uint64_t seq;
	uint16_t count;
	uint8_t kind;
	uint8_t ok;
	uint32_t err;
	int64_t deadline_ns;
	int64_t send_ns;
	int64_t arrival_ns;
	int64_t release_ns;
	int64_t handed_ns;
};
_Static_assert(sizeof(struct pump_record) == 72, "pump_record size");
_Static_assert(offsetof(struct pump_record, seq) == 16, "pump_record.seq offset");
_Static_assert(offsetof(struct pump_record, count) == 24, "pump_record.count offset");
_Static_assert(offsetof(struct pump_record, err) == 28, "pump_record.err offset");
_Static_assert(offsetof(struct pump_record, deadline_ns) == 32, "pump_record.deadline offset");
_Static_assert(offsetof(struct pump_record, handed_ns) == 64, "pump_record.handed offset");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "records are little-endian");

#define RECORD_FORMAT "<IIIIQHBBIqqqqq"
#define RECORD_DOC                                                                                \
	"One release record, little-endian, 72 bytes, no padding (struct format RECORD_FORMAT,\n" \
	"numpy dtype numpy.dtype(list(RECORD_FIELDS))):\n"                                        \
	"  0 endpoint   u32  MP endpoint index\n"                                                 \
	"  4 parent     u32  parent id of the copy kept (0xFFFFFFFE: unknown source)\n"          \
	"  8 stream_id  u32\n"                                                                    \
	" 12 session    u32\n"                                                                    \
	" 16 seq        u64  first message's sequence number\n"                                   \
	" 24 count      u16  messages in the datagram\n"                                          \
	" 26 kind       u8   0 ON_TIME, 1 LATE, 2 UNSTAMPED, 3 OVERFLOW\n"                         \
	" 27 ok         u8   1 sent (or queued in process), 0 not\n"                               \
	" 28 err        u32  errno of the failed send (ENOBUFS: in-process queue full), else 0\n"  \
	" 32 deadline_ns i64 deadline in force (clamped), node clock; 0 when unstamped\n"         \
	" 40 send_ns    i64  header's root send time\n"                                           \
	" 48 arrival_ns i64  effective arrival (kernel rx + clock offset + link delay), node clock\n" \
	" 56 release_ns i64  the core's now at release, node clock\n"                             \
	" 64 handed_ns  i64  CLOCK_REALTIME right after the sendto returned (or the queueing)\n"

/* ---- small helpers ------------------------------------------------------------------------ */

static int64_t realtime_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += UINT64_C(0x9E3779B97F4A7C15));
	z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
	return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

/* ---- emulated links ----------------------------------------------------------------------- */

struct link {
	uint32_t parent, endpoint;
	uint8_t used, has_spare;
	double factor; /* delay multiplier (lemon), default 1.0 */
	double spare; /* Box-Muller's second normal variate */
	uint64_t s[4]; /* xoshiro256** state */
};

struct linkmodel {
	int on;
	double mu, sigma, spike_prob, spike_min, spike_max, loss;
	uint64_t seed;
	struct link *tab; /* open addressing on (parent, endpoint), cap a power of two */
	size_t cap, n;
	struct link shared; /* links beyond MAX_LINKS draw from this one */
};

static uint64_t xoshiro(struct link *l)
{
	uint64_t *s = l->s;
	uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return out;
}

static double uniform(struct link *l) /* [0, 1) */
{
	return (double)(xoshiro(l) >> 11) * 0x1.0p-53;
}

static double normal(struct link *l)
{
	if (l->has_spare) {
		l->has_spare = 0;
		return l->spare;
	}
	double u1 = 1.0 - uniform(l), u2 = uniform(l); /* u1 in (0, 1]: log is finite */
	double r = sqrt(-2.0 * log(u1)), a = 2.0 * M_PI * u2;
	l->spare = r * sin(a);
	l->has_spare = 1;
	return r * cos(a);
}

static void link_seed(struct link *l, uint64_t seed, uint32_t parent, uint32_t endpoint)
{
	uint64_t a = seed, b = ((uint64_t)parent << 32) | endpoint;
	uint64_t x = splitmix64(&a) ^ rotl(splitmix64(&b), 17);
	for (int i = 0; i < 4; i++)
		l->s[i] = splitmix64(&x);
	l->has_spare = 0;
}

static size_t link_hash(uint32_t parent, uint32_t endpoint)
{
	uint64_t x = ((uint64_t)parent << 32) | endpoint;
	x *= UINT64_C(0x9E3779B97F4A7C15);
	return (size_t)(x ^ (x >> 29));
}

/* The slot of (parent, endpoint) in tab, or its free slot. */
static struct link *link_slot(struct link *tab, size_t cap, uint32_t parent, uint32_t endpoint)
{
	size_t i = link_hash(parent, endpoint) & (cap - 1);
	while (tab[i].used && (tab[i].parent != parent || tab[i].endpoint != endpoint))
		i = (i + 1) & (cap - 1);
	return &tab[i];
}

static int link_grow(struct linkmodel *m)
{
	size_t cap = m->cap ? m->cap * 2 : 64;
	struct link *tab = calloc(cap, sizeof *tab);
	if (!tab)
		return -1;
	for (size_t i = 0; i < m->cap; i++)
		if (m->tab[i].used)
			*link_slot(tab, cap, m->tab[i].parent, m->tab[i].endpoint) = m->tab[i];
	free(m->tab);
	m->tab = tab;
	m->cap = cap;
	return 0;
}

/* The link (parent, endpoint), made on first use; the shared one when the table is full. */
static struct link *link_get(struct linkmodel *m, uint32_t parent, uint32_t endpoint,
			     uint64_t *overflow)
{
	if (m->cap) {
		struct link *l = link_slot(m->tab, m->cap, parent, endpoint);
		if (l->used)
			return l;
	}
	if ((m->n + 1) * 4 > m->cap * 3 && (m->n >= MAX_LINKS || link_grow(m) != 0)) {
		(*overflow)++;
		return &m->shared;
	}
	struct link *l = link_slot(m->tab, m->cap, parent, endpoint);
	l->used = 1;
	l->parent = parent;
	l->endpoint = endpoint;
	l->factor = 1.0;
	link_seed(l, m->seed, parent, endpoint);
	m->n++;
	return l;
}

/* The delay of the next copy on the link in ns, or -1 when it is lost. The number of variates
 * drawn depends on the configuration only, as in jasper.linkmodel.LinkSampler.sample. */
static int64_t link_sample(const struct linkmodel *m, struct link *l)
{
	int lost = m->loss > 0.0 && uniform(l) < m->loss;
	double delay = exp(m->mu + m->sigma * normal(l));
	if (m->spike_prob > 0.0) {
		int spiked = uniform(l) < m->spike_prob;
		double spike = m->spike_min + uniform(l) * (m->spike_max - m->spike_min);
		if (spiked)
			delay = spike;
	}
	if (lost)
		return -1;
	delay *= l->factor;
	if (!(delay < 1e15)) /* also NaN: about 11.6 days, far beyond any hold */
		delay = 1e15;
	return delay > 0.0 ? (int64_t)delay : 0;
}

static void link_free(struct linkmodel *m)
{
	free(m->tab);
	m->tab = NULL;
	m->cap = m->n = 0;
}

/* ---- the path model: the whole tree's links, emulated at the receiver ---------------------- */
/*
 * With the plan known, a copy's emulated arrival is computed over its whole path instead of
 * its last hop (docs/link-model.md, "The fast path and the link model"). Each hop's delay and
 * loss for a datagram are drawn from a counter-based hash of (seed, link src->dst by the nodes'
 * global keys, stream, session, first seq), so every receiver host draws the same fate for a
 * shared relay's links without talking to others. The emulated time at which relay R forwards
 * datagram m is E(R) = min over R's senders S of E(S) + d(S->R, m), over the copies not lost;
 * the publisher's is the header's send time; a relay whose every input was lost never forwards.
 */

#define PATH_MAX_NODES (1u << 16)
#define PATH_MAX_EDGES (1u << 20)
#define PATH_MAX_DEPTH 64
#define PATH_MEMO 4096 /* memoized E(node, datagram): a direct-mapped cache, a power of two */
#define PATH_NEVER INT64_MAX /* E of a node that never forwards the datagram */
#define GOLDEN UINT64_C(0x9E3779B97F4A7C15)

struct path_node {
	uint32_t id; /* the parent id (set_parents' table) */
	uint64_t key; /* global: the same on every host (a hash of the node's name) */
	double factor; /* delay factor of links touching it (lemons), >= 1 */
	uint32_t first_in, n_in; /* its senders: in[first_in .. first_in + n_in) */
};

struct path_in {
	uint32_t src; /* node index of a sender */
	double loss; /* loss on this link; < 0: the model's */
};

struct path_endpoint {
	uint64_t key;
	double factor;
	uint8_t known;
};

struct path_memo {
	uint64_t seq, send_ns;
	uint32_t node, stream, session, used;
	int64_t e;
};

struct pathmodel {
	int on;
	uint32_t publisher; /* node index */
	struct path_node *nodes;
	uint32_t nnodes;
	struct path_in *in;
	uint32_t nin;
	uint32_t *index; /* open addressing: parent id -> node index + 1 (0: empty) */
	size_t icap;
	struct path_endpoint *eps; /* by endpoint index */
	uint32_t neps;
	struct path_memo *memo; /* PATH_MEMO entries */
};

static uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
	return z ^ (z >> 31);
}

static double unit_of(uint64_t x) /* [0, 1) */
{
	return (double)(x >> 11) * 0x1.0p-53;
}

static uint64_t datagram_key(uint32_t stream, uint32_t session, uint64_t seq)
{
	return mix64(((uint64_t)stream << 32 | session) ^ mix64(seq + GOLDEN));
}

/*
 * The delay in ns of datagram `mkey` on the link src_key -> dst_key, or -1 when it is lost
 * there: LinkSampler's distribution (lognormal body, spikes, loss, factor), each variate a
 * hash of (seed, link, datagram, its index), so no state is carried from copy to copy.
 */
static int64_t path_draw(const struct linkmodel *m, uint64_t src_key, uint64_t dst_key,
			 uint64_t mkey, double factor, double loss)
{
	uint64_t h = mix64(m->seed ^ mix64(src_key ^ mix64(dst_key + GOLDEN)) ^ mkey);
	double u_loss = unit_of(mix64(h + 1 * GOLDEN));
	double u1 = unit_of(mix64(h + 2 * GOLDEN)), u2 = unit_of(mix64(h + 3 * GOLDEN));
	double u_spiked = unit_of(mix64(h + 4 * GOLDEN)), u_spike = unit_of(mix64(h + 5 * GOLDEN));
	if (loss < 0.0)
		loss = m->loss;
	if (loss > 0.0 && u_loss < loss)
		return -1;
	double normal = sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2); /* 1 - u1 in (0, 1] */
	double delay = exp(m->mu + m->sigma * normal);
	if (m->spike_prob > 0.0 && u_spiked < m->spike_prob)
		delay = m->spike_min + u_spike * (m->spike_max - m->spike_min);
	delay *= factor;
	if (!(delay < 1e15))
		delay = 1e15;
	return delay > 0.0 ? (int64_t)delay : 0;
}

static size_t path_id_hash(uint32_t id)
{
	return (size_t)mix64(id);
}

/* The node index of parent id `id`, or -1. */
static int64_t path_lookup(const struct pathmodel *pm, uint32_t id)
{
	if (!pm->icap)
		return -1;
	for (size_t i = path_id_hash(id) & (pm->icap - 1);; i = (i + 1) & (pm->icap - 1)) {
		uint32_t v = pm->index[i];
		if (!v)
			return -1;
		if (pm->nodes[v - 1].id == id)
			return (int64_t)(v - 1);
	}
}

static void path_free(struct pathmodel *pm)
{
	free(pm->nodes);
	free(pm->in);
	free(pm->index);
	free(pm->eps);
	free(pm->memo);
	memset(pm, 0, sizeof *pm);
}

struct path_stats {
	uint64_t memo_hits, memo_misses, too_deep;
};

/* E(node, m): the emulated time the node forwards the datagram (kernel-clock ns), or
 * PATH_NEVER. Memoized; recursion bounded by PATH_MAX_DEPTH (a cycle counts too_deep). */
static int64_t path_forward_time(const struct pathmodel *pm, const struct linkmodel *lm,
				 uint32_t node, uint32_t stream, uint32_t session, uint64_t seq,
				 uint64_t mkey, int64_t send_ns, int depth, struct path_stats *st)
{
	if (node == pm->publisher)
		return send_ns;
	if (depth >= PATH_MAX_DEPTH) {
		st->too_deep++;
		return PATH_NEVER;
	}
	struct path_memo *c = &pm->memo[(mix64(mkey ^ node) & (PATH_MEMO - 1))];
	if (c->used && c->node == node && c->seq == seq && c->stream == stream &&
	    c->session == session && c->send_ns == (uint64_t)send_ns) {
		st->memo_hits++;
		return c->e;
	}
	st->memo_misses++;
	const struct path_node *n = &pm->nodes[node];
	int64_t best = PATH_NEVER;
	for (uint32_t k = 0; k < n->n_in; k++) {
		const struct path_in *e = &pm->in[n->first_in + k];
		int64_t from = path_forward_time(pm, lm, e->src, stream, session, seq, mkey, send_ns,
						 depth + 1, st);
		if (from == PATH_NEVER)
			continue;
		const struct path_node *s = &pm->nodes[e->src];
		double f = s->factor > n->factor ? s->factor : n->factor;
		int64_t d = path_draw(lm, s->key, n->key, mkey, f, e->loss);
		if (d < 0)
			continue;
		int64_t t = from > INT64_MAX - 1 - d ? INT64_MAX - 1 : from + d;
		if (t < best)
			best = t;
	}
	/* The entry may have been reused by the recursion: write it whole. */
	c = &pm->memo[(mix64(mkey ^ node) & (PATH_MEMO - 1))];
	*c = (struct path_memo){.seq = seq, .send_ns = (uint64_t)send_ns, .node = node,
				.stream = stream, .session = session, .used = 1, .e = best};
	return best;
}

/*
 * The emulated arrival at endpoint `endpoint` of the copy parent `parent_id` sent of the
 * datagram (kernel-clock ns): 1 and *out; 0 when it is lost (the parent never forwarded it, or
 * the last hop lost it); -1 when the path model does not know the parent or the endpoint.
 */
static int path_arrival_of(const struct pathmodel *pm, const struct linkmodel *lm,
			   uint32_t parent_id, uint32_t endpoint, uint32_t stream, uint32_t session,
			   uint64_t seq, int64_t send_ns, int heartbeat, int64_t *out,
			   struct path_stats *st)
{
	int64_t node = path_lookup(pm, parent_id);
	if (node < 0 || endpoint >= pm->neps || !pm->eps[endpoint].known)
		return -1;
	uint64_t mkey = datagram_key(stream, session, seq);
	/* A heartbeat carries the newest seq: keyed like that message it would share its fate on
	 * every link (the tail heartbeats of a message lost to an endpoint would all be lost there
	 * too, and the loss never noticed). Its send time makes each heartbeat a datagram of its
	 * own, the same on every host. */
	if (heartbeat)
		mkey = mix64(mkey ^ mix64((uint64_t)send_ns ^ UINT64_C(0x6865617274626561)));
	int64_t from = path_forward_time(pm, lm, (uint32_t)node, stream, session, seq, mkey,
					 send_ns, 0, st);
	if (from == PATH_NEVER)
		return 0;
	const struct path_node *s = &pm->nodes[node];
	const struct path_endpoint *x = &pm->eps[endpoint];
	double f = s->factor > x->factor ? s->factor : x->factor;
	int64_t d = path_draw(lm, s->key, x->key, mkey, f, -1.0);
	if (d < 0)
		return 0;
	*out = from > INT64_MAX - 1 - d ? INT64_MAX - 1 : from + d;
	return 1;
}

/* ---- parents: (IPv4, port) -> id --------------------------------------------------------- */

struct parent_entry {
	uint32_t ip; /* network byte order */
	uint16_t port; /* host byte order; 0 = any port of ip */
	uint8_t used;
	uint32_t id;
};

static size_t parent_hash(uint32_t ip, uint16_t port)
{
	uint64_t x = ((uint64_t)ip << 16 | port) * UINT64_C(0x9E3779B97F4A7C15);
	return (size_t)(x ^ (x >> 31));
}

static struct parent_entry *parent_slot(struct parent_entry *tab, size_t cap, uint32_t ip,
					uint16_t port)
{
	size_t i = parent_hash(ip, port) & (cap - 1);
	while (tab[i].used && (tab[i].ip != ip || tab[i].port != port))
		i = (i + 1) & (cap - 1);
	return &tab[i];
}

/* ---- the pump ------------------------------------------------------------------------------ */

/* Where the NAKs of one stream go: its publisher's port (docs/recovery.md). */
struct nak_dest {
	uint32_t stream_id;
	struct sockaddr_in addr;
};

struct endpoint {
	int fd; /* our dup of the receive socket, -1: none yet; NAKs are sent from it too */
	int out_fd; /* our dup of the delivery socket, -1: in process, -2: in process, no reader */
	socklen_t addr_len;
	struct sockaddr_storage addr;
	uint64_t kernel_drops, truncated, link_lost, delivered, recv_errors, nak_errors;
	struct {
		int err;
		uint64_t n;
	} errs[ERRNO_SLOTS];
	uint64_t errs_other;
};

struct delivery {
	uint32_t endpoint, stream_id, session;
	uint64_t seq;
	uint16_t count;
	uint8_t kind, mp_flags;
	int64_t deadline_ns, handed_ns;
	uint8_t *payload;
	size_t len;
};

enum { IDLE, RUNNING, STOPPING, STOPPED, CLOSED };

typedef struct {
	PyObject_HEAD
	pthread_mutex_t mu;
	int mu_ok;
	int state; /* IDLE .. CLOSED */
	int joining; /* a Python thread waits in pthread_join (GIL released) */
	int drain; /* with STOPPING */
	int64_t stop_until; /* CLOCK_REALTIME end of the on-time drain */
	uint64_t flushed; /* released by the final jc_flush */
	pthread_t thread;

	struct jc_core *core;
	struct endpoint *eps;
	uint32_t neps, cap_eps;
	int epfd, wake_fd, notify_fd, warm_fd;
	struct sockaddr_in warm_addr;
	int64_t offset, last_now, spin_ns, coalesce_ns;
	int64_t core_now; /* the time the core was last advanced to */
	int priority, cpu;
	int pwait2; /* 1 while epoll_pwait2 works */

	/* The adaptive lead: how long before a deadline the thread wakes to spin (see plan_wait). */
	int64_t lead_ns;
	int64_t oversleep[LEAD_SAMPLES]; /* recent oversleeps of timed waits toward a deadline */
	size_t noversleep;
	int64_t warmed_for; /* the deadline the send path was last warmed for */
	int64_t spin_for; /* the deadline of the current spin (valid while plan_wait returns 0) */
	int round_due; /* data seen, its receive round deferred until round_at (realtime) */
	int64_t round_at;

	struct parent_entry *ptab;
	size_t pcap;
	uint32_t *streams; /* stream ids given to jc_set_stream by the last set_streams */
	size_t nstreams;
	struct linkmodel lm;
	struct pathmodel pm;
	struct path_stats pst;

	/* candidate deadlines: a min-heap */
	int64_t *cand;
	size_t ncand, cap_cand;
	int64_t cand_last;
	int cand_lossy; /* a candidate was refused: treat every timer as a deadline */

	struct pump_record *rec;
	size_t rec_cap, rec_head, rec_len;
	struct delivery *dq;
	size_t dq_cap, dq_head, dq_len;

	uint8_t *bufs;
	uint8_t *cmsgs;
	struct sockaddr_storage *names;
	struct iovec *iov;
	struct mmsghdr *msgs;
	struct jc_release rel[BATCH];
	uint8_t *mp_out; /* one delivery datagram framed for an MP (JASPER_MP_MAX_DELIVERY) */
	struct jc_nak naks[8]; /* NAKs taken from the core, being sent */
	struct nak_dest *nak_dests; /* per stream, from set_recovery */
	size_t nnak_dests;
	uint64_t naks_sent, naks_unaddressed, nak_errors;

	uint64_t recv_calls, datagrams, batches, link_lost, link_overflow, records_dropped,
		deliveries_dropped, truncated, wakeups, warmups, rounds, rounds_cut, coalesced, spins,
		spin_total_ns, late_wakes, path_copies, path_floored;
	int realtime_ok, pinned, sched_errno, pin_errno;
} Pump;

static int64_t node_now(Pump *p)
{
	int64_t now = realtime_ns() + p->offset;
	if (now < p->last_now) /* the core wants non-decreasing time: a stepped clock or offset */
		now = p->last_now;
	if (now < 0)
		now = 0;
	p->last_now = now;
	return now;
}

static void wake(Pump *p)
{
	uint64_t one = 1;
	ssize_t rc = write(p->wake_fd, &one, sizeof one);
	(void)rc; /* EAGAIN: the counter is already set, the thread wakes anyway */
}

/* ---- candidate deadlines ---------------------------------------------------------------- */

static void cand_push(Pump *p, int64_t d)
{
	if (d == p->cand_last && p->ncand)
		return; /* the copies of one message share their deadline */
	if (p->ncand == p->cap_cand) {
		p->cand_lossy = 1;
		return;
	}
	size_t i = p->ncand++;
	while (i > 0) {
		size_t up = (i - 1) / 2;
		if (p->cand[up] <= d)
			break;
		p->cand[i] = p->cand[up];
		i = up;
	}
	p->cand[i] = d;
	p->cand_last = d;
}

static void cand_pop_until(Pump *p, int64_t now)
{
	if (p->ncand && p->cand[0] <= now)
		p->cand_last = -1; /* it may be popped: the next push must not be skipped */
	while (p->ncand && p->cand[0] <= now) {
		int64_t x = p->cand[--p->ncand];
		size_t i = 0, n = p->ncand;
		for (;;) {
			size_t c = 2 * i + 1;
			if (c >= n)
				break;
			if (c + 1 < n && p->cand[c + 1] < p->cand[c])
				c++;
			if (p->cand[c] >= x)
				break;
			p->cand[i] = p->cand[c];
			i = c;
		}
		if (n)
			p->cand[i] = x;
	}
}

/* ---- releases ------------------------------------------------------------------------------ */

static void count_error(struct endpoint *e, int err)
{
	for (int i = 0; i < ERRNO_SLOTS; i++) {
		if (e->errs[i].n && e->errs[i].err == err) {
			e->errs[i].n++;
			return;
		}
		if (!e->errs[i].n) {
			e->errs[i].err = err;
			e->errs[i].n = 1;
			return;
		}
	}
	e->errs_other++;
}

#define OUT_DISCARD (-2)

static int deliver_in_process(Pump *p, const struct jc_release *r, int64_t handed)
{
	if (p->dq_len == p->dq_cap)
		return ENOBUFS;
	uint8_t *copy = malloc(r->payload_len ? r->payload_len : 1);
	if (!copy)
		return ENOMEM;
	if (r->payload_len)
		memcpy(copy, r->payload, r->payload_len);
	struct delivery *d = &p->dq[(p->dq_head + p->dq_len) % p->dq_cap];
	d->endpoint = r->endpoint;
	d->stream_id = r->stream_id;
	d->session = r->session;
	d->seq = r->seq;
	d->count = r->count;
	d->kind = r->kind;
	d->mp_flags = r->mp_flags;
	d->deadline_ns = (int64_t)r->deadline_ns;
	d->handed_ns = handed;
	d->payload = copy;
	d->len = r->payload_len;
	p->dq_len++;
	return 0;
}

/* Hand every release the core has over; signal notify_fd once when something was queued. */
static void release_all(Pump *p)
{
	size_t n;
	int queued = 0;
	while ((n = jc_take_releases(p->core, p->rel, BATCH)) > 0) {
		/* The payload pointers hold until the next take: hand the whole batch over first. */
		for (size_t i = 0; i < n; i++) {
			const struct jc_release *r = &p->rel[i];
			struct endpoint *e = r->endpoint < p->neps ? &p->eps[r->endpoint] : NULL;
			int err = 0;
			int64_t handed;
			if (e && e->out_fd >= 0) {
				const struct sockaddr *to =
					e->addr_len ? (const struct sockaddr *)&e->addr : NULL;
				/* Framed in place: a header per message (docs/mp-feed.md). */
				size_t len = jc_frame(r, p->mp_out, JASPER_MP_MAX_DELIVERY);
				ssize_t rc = len || !r->count
						     ? sendto(e->out_fd, p->mp_out, len, MSG_DONTWAIT, to,
							      e->addr_len)
						     : -1;
				handed = realtime_ns();
				if (rc < 0)
					err = len || !r->count ? (errno ? errno : EIO) : EMSGSIZE;
			} else if (e && e->out_fd == OUT_DISCARD) {
				/* Released in process with no reader (an emulated MP, records only):
				 * stamped and counted, not copied into a queue Python would drain. */
				handed = realtime_ns();
			} else {
				handed = realtime_ns();
				err = deliver_in_process(p, r, handed);
				if (err)
					p->deliveries_dropped++;
				else
					queued = 1;
			}
			if (e) {
				if (err)
					count_error(e, err);
				else
					e->delivered++;
			}
			if (!p->rec_cap)
				continue;
			if (p->rec_len == p->rec_cap) {
				p->records_dropped++;
				continue;
			}
			struct pump_record *o = &p->rec[(p->rec_head + p->rec_len++) % p->rec_cap];
			o->endpoint = r->endpoint;
			o->parent = r->parent;
			o->stream_id = r->stream_id;
			o->session = r->session;
			o->seq = r->seq;
			o->count = r->count;
			o->kind = r->kind;
			o->ok = err == 0;
			o->err = (uint32_t)err;
			o->deadline_ns = (int64_t)r->deadline_ns;
			o->send_ns = (int64_t)r->send_ns;
			o->arrival_ns = r->arrival_ns;
			o->release_ns = r->release_ns;
			o->handed_ns = handed;
		}
	}
	if (queued) {
		uint64_t one = 1;
		ssize_t rc = write(p->notify_fd, &one, sizeof one);
		(void)rc;
	}
}

/* Send every NAK the core has due, from the socket of the endpoint that misses the messages
 * (the publisher answers only an endpoint of the plan, at the address the NAK came from). */
static void send_naks(Pump *p)
{
	size_t n;
	while ((n = jc_take_naks(p->core, p->naks, sizeof p->naks / sizeof p->naks[0])) > 0) {
		for (size_t i = 0; i < n; i++) {
			const struct jc_nak *k = &p->naks[i];
			const struct nak_dest *d = NULL;
			for (size_t j = 0; j < p->nnak_dests && !d; j++)
				if (p->nak_dests[j].stream_id == k->stream_id)
					d = &p->nak_dests[j];
			struct endpoint *e = k->endpoint < p->neps ? &p->eps[k->endpoint] : NULL;
			if (!d || !e || e->fd < 0) {
				/* a stream whose plan names no publisher port (or is gone) */
				p->naks_unaddressed++;
				continue;
			}
			if (sendto(e->fd, k->data, k->len, MSG_DONTWAIT, (const struct sockaddr *)&d->addr,
				   sizeof d->addr) < 0) {
				p->nak_errors++;
				e->nak_errors++;
			} else {
				p->naks_sent++;
			}
		}
	}
}

/* ---- receiving ----------------------------------------------------------------------------- */

static uint32_t parent_of(const Pump *p, const struct sockaddr_storage *ss, socklen_t len)
{
	if (!p->pcap || ss->ss_family != AF_INET || len < (socklen_t)sizeof(struct sockaddr_in))
		return UNKNOWN_PARENT;
	const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
	uint32_t ip = sin->sin_addr.s_addr;
	struct parent_entry *e = parent_slot(p->ptab, p->pcap, ip, ntohs(sin->sin_port));
	if (!e->used)
		e = parent_slot(p->ptab, p->pcap, ip, 0);
	return e->used ? e->id : UNKNOWN_PARENT;
}

/*
 * One recvmmsg batch from endpoint idx into the core; the number of datagrams (-1: error).
 *
 * Copies are fed at the time the core was last advanced to (p->core_now, not advanced here):
 * one that arrived after it waits in the pending set, and the caller's next tick processes the
 * whole round in order of emulated arrival. Fed at the clock instead, a copy the thread reads late (a
 * coalesced round, a busy host) would be processed at once in the order the kernel queues
 * returned it, and a later copy with an earlier emulated arrival would lose to it.
 */
static int receive_batch(Pump *p, uint32_t idx)
{
	struct endpoint *e = &p->eps[idx];
	if (e->fd < 0)
		return 0;
	for (int k = 0; k < BATCH; k++) {
		struct msghdr *h = &p->msgs[k].msg_hdr;
		h->msg_name = &p->names[k];
		h->msg_namelen = sizeof p->names[k];
		h->msg_iov = &p->iov[k];
		h->msg_iovlen = 1;
		h->msg_control = p->cmsgs + (size_t)k * CMSG_BYTES;
		h->msg_controllen = CMSG_BYTES;
		h->msg_flags = 0;
		p->msgs[k].msg_len = 0;
	}
	int n = recvmmsg(e->fd, p->msgs, BATCH, MSG_DONTWAIT, NULL);
	p->recv_calls++;
	if (n < 0) {
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			e->recv_errors++;
		return -1;
	}
	if (n == 0)
		return 0;
	p->batches++;
	p->datagrams += (uint64_t)n;
	for (int k = 0; k < n; k++) {
		struct msghdr *h = &p->msgs[k].msg_hdr;
		const uint8_t *data = p->bufs + (size_t)k * SLOT_BYTES;
		size_t len = p->msgs[k].msg_len;
		int64_t rx = -1;
		for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
			if (c->cmsg_level != SOL_SOCKET)
				continue;
			if (c->cmsg_type == SO_TIMESTAMPNS &&
			    c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
				struct timespec ts;
				memcpy(&ts, CMSG_DATA(c), sizeof ts);
				rx = (int64_t)ts.tv_sec * NS + ts.tv_nsec;
			} else if (c->cmsg_type == SO_RXQ_OVFL &&
				   c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
				uint32_t drops;
				memcpy(&drops, CMSG_DATA(c), sizeof drops);
				e->kernel_drops = drops;
			}
		}
		if ((h->msg_flags & MSG_TRUNC) || len > SLOT_BYTES) {
			/* Longer than the slot: the core sees SLOT_BYTES > MAX_DATAGRAM, "length". */
			e->truncated++;
			p->truncated++;
			len = SLOT_BYTES;
		}
		uint32_t parent = parent_of(p, &p->names[k], h->msg_namelen);
		int64_t now = p->core_now;
		int64_t real = rx >= 0 ? rx : p->last_now - p->offset; /* kernel clock */
		int64_t arrival = real + p->offset;
		struct jc_header hdr;
		int parsed = jc_parse(data, len, &hdr) == JC_PARSE_OK;
		if (p->lm.on) {
			int fate = -1; /* path model: 1 emulated, 0 lost; -1 last hop only */
			int64_t t = 0;
			/* A retransmission comes straight from the publisher, off the tree, and must not
			 * draw the fate of its (stream, session, seq) again (lost once, lost forever):
			 * its one hop takes the next draw of the link's own generator instead. */
			if (p->pm.on && parsed && !(hdr.flags & JASPER_FLAG_RETRANSMIT)) {
				int64_t send = hdr.send_time_ns > (uint64_t)INT64_MAX
						       ? INT64_MAX
						       : (int64_t)hdr.send_time_ns;
				fate = path_arrival_of(&p->pm, &p->lm, parent, idx, hdr.stream_id,
						       hdr.session, hdr.seq, send,
						       (hdr.flags & JASPER_FLAG_HEARTBEAT) != 0, &t,
						       &p->pst);
			}
			if (fate == 1) {
				/* The copy is here: no emulated path can make it arrive earlier. */
				if (t < real) {
					t = real;
					p->path_floored++;
				}
				p->path_copies++;
				arrival = p->offset > 0 && t > INT64_MAX - p->offset ? INT64_MAX : t + p->offset;
			} else {
				int64_t delay = 0;
				if (fate < 0) {
					struct link *l = link_get(&p->lm, parent, idx, &p->link_overflow);
					delay = link_sample(&p->lm, l);
				}
				if (fate == 0 || delay < 0) {
					e->link_lost++;
					p->link_lost++;
					continue;
				}
				arrival += delay;
			}
		}
		if (arrival < 0)
			arrival = 0;
		/* Only copies that may pass authentication plan a wake-up: a forger without the
		 * stream's key epoch cannot make the thread spin toward deadlines of its choosing. */
		if (parsed && hdr.deadline_ns > (uint64_t)p->last_now &&
		    hdr.deadline_ns <= (uint64_t)INT64_MAX && jc_may_admit(p->core, &hdr))
			cand_push(p, (int64_t)hdr.deadline_ns);
		jc_datagram(p->core, idx, data, len, parent, arrival, now);
		if (jc_releases_waiting(p->core))
			release_all(p); /* LATE and UNSTAMPED copies that arrived before `now` */
		if (jc_naks_waiting(p->core))
			send_naks(p);
	}
	return n;
}

/* ---- the thread ---------------------------------------------------------------------------- */

/* Advance the core to now and hand over what it releases; drop passed candidates. */
static void tick(Pump *p, int64_t now)
{
	if (jc_next_timer(p->core) <= now) {
		jc_advance(p->core, now);
		p->core_now = now;
		release_all(p);
		send_naks(p);
	}
	cand_pop_until(p, now);
	if (!jc_held(p->core) && !jc_pending(p->core)) {
		p->ncand = 0;
		p->cand_lossy = 0;
	}
}

/* One oversleep of a timed wait toward a deadline's lead point: the lead follows them. */
static void lead_sample(Pump *p, int64_t over)
{
	if (over < 0)
		over = 0;
	if (over > p->lead_ns)
		p->late_wakes++; /* woke after the deadline's spin should have begun */
	p->oversleep[p->noversleep++ % LEAD_SAMPLES] = over;
	size_t n = p->noversleep < LEAD_SAMPLES ? p->noversleep : LEAD_SAMPLES;
	int64_t first = 0, second = 0;
	for (size_t i = 0; i < n; i++) {
		int64_t v = p->oversleep[i];
		if (v > first) {
			second = first;
			first = v;
		} else if (v > second) {
			second = v;
		}
	}
	int64_t lead = (n < LEAD_SAMPLES ? first : second) + LEAD_GUARD_NS;
	if (lead < LEAD_MIN_NS)
		lead = LEAD_MIN_NS;
	p->lead_ns = lead < p->spin_ns ? lead : p->spin_ns;
}

/* Run the send path once, so the first release after a sleep does not pay for a cold one. */
static void warm_send_path(Pump *p)
{
	char b[16] = {0};
	ssize_t rc = sendto(p->warm_fd, b, sizeof b, MSG_DONTWAIT,
			    (const struct sockaddr *)&p->warm_addr, sizeof p->warm_addr);
	while (rc >= 0 && recv(p->warm_fd, b, sizeof b, MSG_DONTWAIT) > 0)
		;
	p->warmups++;
}

/*
 * How long to wait from now: -1 forever, 0 spin (poll and look at the clock again), else ns.
 * *toward is set when the wait ends at a deadline's lead point (its oversleep is a sample).
 *
 * A deadline is met by waking lead_ns before it and spinning the rest: the lead adapts to the
 * oversleep this host shows (lead_sample), capped by spin_ns, so the spin is about the spread
 * of the wake-up latency, not its whole. A pending arrival needs no precision (see the top of
 * this file): its wake-up waits coalesce_ns longer, so the arrivals of a burst are processed
 * in one wake-up.
 */
static int64_t plan_wait(Pump *p, int64_t now, int *toward)
{
	/* NAKs due are planned apart: neither a spin nor the coalescing wait (below). */
	int64_t timer = jc_next_copy_timer(p->core), nak = jc_next_nak(p->core);
	/* Every held deadline and pending arrival is >= timer, so a smaller candidate releases
	 * nothing (a pending copy processed after its deadline is late, never held). */
	while (!p->cand_lossy && p->ncand && p->cand[0] < timer)
		cand_pop_until(p, p->cand[0]);
	int64_t deadline = p->cand_lossy ? timer : (p->ncand ? p->cand[0] : INT64_MAX);
	int64_t wake_at = INT64_MAX;
	*toward = 0;
	if (timer < deadline) /* the next pending arrival */
		wake_at = timer > INT64_MAX - p->coalesce_ns ? INT64_MAX : timer + p->coalesce_ns;
	if (nak < wake_at) /* a NAK goes when due: its delay and jitter are the schedule's */
		wake_at = nak;
	if (deadline != INT64_MAX) {
		if (deadline - now <= p->lead_ns) {
			p->spin_for = deadline;
			if (deadline != p->warmed_for) {
				/* Once per deadline: the spin and the warm-up it may pay for. */
				p->warmed_for = deadline;
				p->spins++;
				if (deadline - now > WARM_MIN_NS && p->warm_fd >= 0)
					warm_send_path(p);
			}
			return 0;
		}
		if (deadline - p->lead_ns < wake_at) {
			wake_at = deadline - p->lead_ns;
			*toward = 1;
		}
	}
	if (wake_at == INT64_MAX)
		return -1;
	return wake_at > now ? wake_at - now : 0;
}

static int wait_events(Pump *p, struct epoll_event *evs, int max, int64_t timeout_ns)
{
	if (p->pwait2) {
		struct timespec ts = {.tv_sec = timeout_ns / NS, .tv_nsec = timeout_ns % NS};
		int n = epoll_pwait2(p->epfd, evs, max, timeout_ns < 0 ? NULL : &ts, NULL);
		if (n >= 0 || errno != ENOSYS)
			return n < 0 ? 0 : n;
		p->pwait2 = 0;
	}
	int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);
	if (timeout_ns > (int64_t)INT32_MAX * 1000000)
		ms = INT32_MAX;
	int n = epoll_wait(p->epfd, evs, max, ms);
	return n < 0 ? 0 : n;
}

static void sleep_ns(int64_t ns)
{
	struct timespec ts = {.tv_sec = ns / NS, .tv_nsec = ns % NS};
	clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
}

/* The earliest deadline the thread may have to release at (INT64_MAX: none). */
static int64_t next_deadline(Pump *p)
{
	if (p->cand_lossy)
		return jc_next_copy_timer(p->core);
	return p->ncand ? p->cand[0] : INT64_MAX;
}

/*
 * Receive from the ready endpoints of evs[0..n); with evs NULL, poll epoll for them first.
 * A round that reaches `stop_at` (node time: a deadline) advances the core there first and
 * hands over what it releases, then goes on: a long round never delays a release.
 */
static void receive_round(Pump *p, struct epoll_event *evs, int n, struct epoll_event *buf,
			  int64_t stop_at)
{
	int polls = (int)(p->neps / MAX_EVENTS) + ROUND_EXTRA_POLLS;
	p->round_due = 0;
	for (int k = 0; k < polls && p->state == RUNNING; k++) {
		if (!evs || k > 0) {
			evs = buf;
			n = wait_events(p, evs, MAX_EVENTS, 0);
		}
		for (int i = 0; i < n; i++) {
			uint32_t tag = evs[i].data.u32;
			if (tag == WAKE_TAG) {
				uint64_t v;
				ssize_t rc = read(p->wake_fd, &v, sizeof v);
				(void)rc;
			} else if (tag < p->neps) {
				if (stop_at != INT64_MAX && realtime_ns() + p->offset >= stop_at) {
					tick(p, node_now(p));
					p->rounds_cut++;
					stop_at = INT64_MAX;
				}
				/* A full batch may leave more behind: take a few more at once. */
				for (int b = 0; b < 4 && receive_batch(p, tag) == BATCH; b++)
					;
			}
		}
		if (n < MAX_EVENTS)
			break;
	}
	p->rounds++;
}

static void thread_setup(Pump *p)
{
	prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
	int pinned = 0, pin_errno = 0, realtime_ok = 0, sched_errno = 0;
	if (p->cpu >= 0) {
		/* Two SCHED_FIFO threads on one CPU would send one after the other (releasec.py). */
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(p->cpu, &set);
		pin_errno = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
		pinned = pin_errno == 0;
	}
	if (p->priority > 0) {
		struct sched_param sp = {.sched_priority = p->priority};
		sched_errno = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
		realtime_ok = sched_errno == 0;
	}
	pthread_mutex_lock(&p->mu);
	p->pinned = pinned;
	p->pin_errno = pin_errno;
	p->realtime_ok = realtime_ok;
	p->sched_errno = sched_errno;
	pthread_mutex_unlock(&p->mu);
}

/* Stop with drain (mutex held): take what the kernel queued, release held entries on time until
 * none is left or stop_until passes, then flush the rest at once. */
static void drain_phase(Pump *p)
{
	for (uint32_t i = 0; i < p->neps; i++)
		for (int k = 0; k < DRAIN_BATCHES; k++)
			if (receive_batch(p, i) < BATCH)
				break;
	for (;;) {
		int64_t now = node_now(p);
		tick(p, now);
		if (!jc_held(p->core) && !jc_pending(p->core))
			break;
		int64_t left = p->stop_until - realtime_ns();
		if (left <= 0)
			break;
		int toward;
		int64_t wait = plan_wait(p, now, &toward);
		if (wait == 0)
			continue;
		if (wait < 0 || wait > left)
			wait = left;
		struct timespec ts = {.tv_sec = wait / NS, .tv_nsec = wait % NS};
		pthread_mutex_unlock(&p->mu);
		clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
		pthread_mutex_lock(&p->mu);
	}
	if (jc_held(p->core) || jc_pending(p->core)) {
		p->flushed += jc_held(p->core) + jc_pending(p->core);
		p->core_now = node_now(p);
		jc_flush(p->core, p->core_now);
		release_all(p);
	}
	p->ncand = 0;
}

static void *pump_run(void *arg)
{
	Pump *p = arg;
	struct epoll_event evs[MAX_EVENTS], more[MAX_EVENTS];
	int spinning = 0;
	int64_t spin_from = 0;
	thread_setup(p);
	pthread_mutex_lock(&p->mu);
	while (p->state == RUNNING) {
		int64_t now = node_now(p);
		if (p->round_due) {
			/* A deferred round runs before the core advances, so its copies are fed at
			 * the time before they came and processed in emulated-arrival order. It runs
			 * when its window closes, or at once when a deadline's spin begins (so every
			 * copy in by then is processed before the deadline). */
			int64_t d = next_deadline(p);
			int64_t spin_at = d == INT64_MAX ? INT64_MAX : d - p->lead_ns;
			if (p->round_at <= now || spin_at <= now) {
				receive_round(p, NULL, 0, more, spin_at <= now ? d : INT64_MAX);
				now = node_now(p);
			}
		}
		tick(p, now);
		int toward;
		int64_t wait = plan_wait(p, now, &toward);
		if (wait == 0 && !spinning) {
			spinning = 1;
			spin_from = now;
		} else if (wait != 0 && spinning) {
			spinning = 0;
			p->spin_total_ns += (uint64_t)(now - spin_from);
		}
		if (p->round_due) {
			int64_t left = p->round_at - now;
			if (wait == 0 || left <= 0)
				continue; /* the top of the loop runs it */
			if (wait < 0 || left < wait) {
				wait = left;
				toward = 0;
			}
			pthread_mutex_unlock(&p->mu);
			sleep_ns(wait);
			pthread_mutex_lock(&p->mu);
			p->wakeups++;
			if (toward)
				lead_sample(p, node_now(p) - now - wait);
			continue;
		}
		pthread_mutex_unlock(&p->mu);
		int n = wait_events(p, evs, MAX_EVENTS, wait);
		pthread_mutex_lock(&p->mu);
		if (wait != 0) {
			p->wakeups++;
			if (n == 0 && toward)
				lead_sample(p, node_now(p) - now - wait);
		}
		int data = 0;
		for (int i = 0; i < n; i++) {
			if (evs[i].data.u32 == WAKE_TAG) {
				uint64_t v;
				ssize_t rc = read(p->wake_fd, &v, sizeof v);
				(void)rc;
				evs[i].data.u32 = WAKE_SEEN;
			} else {
				data = 1;
			}
		}
		if (p->state != RUNNING || !data)
			continue;
		if (wait != 0 && p->coalesce_ns > 0) {
			/* Data after a sleep: let the rest of the burst gather for coalesce_ns (never
			 * past a deadline's lead point). The kernel's receive stamps keep every
			 * arrival exact; only the processing waits. */
			p->round_due = 1;
			p->round_at = node_now(p) + p->coalesce_ns;
			p->coalesced++;
			continue;
		}
		receive_round(p, evs, n, more, wait == 0 ? p->spin_for : INT64_MAX);
	}
	if (spinning)
		p->spin_total_ns += (uint64_t)(node_now(p) - spin_from);
	if (p->state == STOPPING && p->drain)
		drain_phase(p);
	pthread_mutex_unlock(&p->mu);
	return NULL;
}

/* ---- Python: helpers ---------------------------------------------------------------------- */

static int int_in(PyObject *obj, long long lo, long long hi, const char *what, long long *out)
{
	int overflow = 0;
	long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
	if (v == -1 && PyErr_Occurred())
		return -1;
	if (overflow || v < lo || v > hi) {
		PyErr_Format(PyExc_ValueError, "%s %R out of range %lld..%lld", what, obj, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

/* Optional keyword int: keeps *out when obj is NULL. */
static int opt_int(PyObject *obj, long long lo, long long hi, const char *what, long long *out)
{
	return obj ? int_in(obj, lo, hi, what, out) : 0;
}

static int check_open(Pump *p)
{
	if (p->state == CLOSED) {
		PyErr_SetString(PyExc_ValueError, "ReceivePump is closed");
		return -1;
	}
	return 0;
}

static int dup_fd(int fd)
{
	int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (d < 0)
		PyErr_SetFromErrno(PyExc_OSError);
	return d;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void free_buffers(Pump *p)
{
	free(p->bufs);
	free(p->cmsgs);
	free(p->names);
	free(p->iov);
	free(p->msgs);
	free(p->mp_out);
	p->mp_out = NULL;
	free(p->cand);
	free(p->rec);
	if (p->dq) {
		for (size_t i = 0; i < p->dq_len; i++)
			free(p->dq[(p->dq_head + i) % p->dq_cap].payload);
		free(p->dq);
	}
	free(p->ptab);
	free(p->nak_dests);
	p->nak_dests = NULL;
	p->nnak_dests = 0;
	free(p->streams);
	p->streams = NULL;
	p->nstreams = 0;
	link_free(&p->lm);
	path_free(&p->pm);
	p->bufs = p->cmsgs = NULL;
	p->names = NULL;
	p->iov = NULL;
	p->msgs = NULL;
	p->cand = NULL;
	p->rec = NULL;
	p->dq = NULL;
	p->ptab = NULL;
	p->dq_len = p->rec_len = p->ncand = 0;
}

/* Join the thread with the GIL released (state set by the caller). */
static void join_thread(Pump *p)
{
	p->joining = 1;
	Py_BEGIN_ALLOW_THREADS
	pthread_join(p->thread, NULL);
	Py_END_ALLOW_THREADS
	p->joining = 0;
}

static void pump_release_all(Pump *p)
{
	if (p->state == RUNNING || p->state == STOPPING) {
		pthread_mutex_lock(&p->mu);
		p->state = STOPPING;
		p->drain = 0;
		pthread_mutex_unlock(&p->mu);
		wake(p);
		join_thread(p);
	}
	if (p->mu_ok && p->state != CLOSED) {
		for (uint32_t i = 0; i < p->neps; i++) {
			close_fd(&p->eps[i].fd);
			close_fd(&p->eps[i].out_fd);
		}
	}
	p->state = CLOSED;
	free(p->eps);
	p->eps = NULL;
	p->neps = p->cap_eps = 0;
	close_fd(&p->epfd);
	close_fd(&p->wake_fd);
	close_fd(&p->notify_fd);
	close_fd(&p->warm_fd);
	if (p->core)
		jc_free(p->core);
	p->core = NULL;
	free_buffers(p);
}

/* ---- Python: ReceivePump ------------------------------------------------------------------ */

static void pump_dealloc(Pump *p)
{
	pump_release_all(p);
	if (p->mu_ok)
		pthread_mutex_destroy(&p->mu);
	Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pump_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
	static char *names[] = {"endpoints", "ring_size", "hold_capacity", "pending_capacity",
				"spin_ns", "priority", "cpu", "record_capacity",
				"delivery_capacity", "coalesce_ns", NULL};
	PyObject *o[10] = {NULL};
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$OOOOOOOOOO:ReceivePump", names, &o[0],
					 &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
					 &o[9]))
		return NULL;
	if (!o[0]) {
		PyErr_SetString(PyExc_TypeError, "ReceivePump() needs endpoints=");
		return NULL;
	}
	long long endpoints, ring = 4096, hold = 65536, pending = 65536, spin = 20000, prio = 0,
			     cpu = -1, rec_bytes = 1 << 20, dcap = 65536,
			     coalesce = DEFAULT_COALESCE_NS;
	if (int_in(o[0], 0, UINT32_MAX, "endpoints", &endpoints) ||
	    opt_int(o[1], 0, UINT32_MAX, "ring_size", &ring) ||
	    opt_int(o[2], 0, UINT32_MAX, "hold_capacity", &hold) ||
	    opt_int(o[3], 0, UINT32_MAX, "pending_capacity", &pending) ||
	    opt_int(o[4], 0, NS, "spin_ns", &spin) || opt_int(o[5], 0, 99, "priority", &prio) ||
	    opt_int(o[6], -1, CPU_SETSIZE - 1, "cpu", &cpu) ||
	    opt_int(o[7], 0, (long long)1 << 34, "record_capacity", &rec_bytes) ||
	    opt_int(o[8], 1, (long long)1 << 24, "delivery_capacity", &dcap) ||
	    opt_int(o[9], 0, NS / 100, "coalesce_ns", &coalesce))
		return NULL;
	struct jc_config cfg = JC_CONFIG_DEFAULT;
	cfg.endpoints = endpoints ? (uint32_t)endpoints : 1;
	cfg.ring_size = (uint32_t)ring;
	cfg.hold_capacity = (uint32_t)hold;
	cfg.pending_capacity = (uint32_t)pending;
	if (jc_config_check(&cfg) != 0) {
		PyErr_SetString(PyExc_ValueError,
				"invalid core config (ring_size: a power of two >= 2; capacities >= 1)");
		return NULL;
	}

	Pump *p = (Pump *)type->tp_alloc(type, 0);
	if (!p)
		return NULL;
	p->epfd = p->wake_fd = p->notify_fd = p->warm_fd = -1;
	p->state = CLOSED; /* until fully made: dealloc then only frees */
	pthread_mutexattr_t ma;
	pthread_mutexattr_init(&ma);
	/* A real-time pump thread must not wait for Python's thread to be scheduled again. */
	pthread_mutexattr_setprotocol(&ma, PTHREAD_PRIO_INHERIT);
	p->mu_ok = pthread_mutex_init(&p->mu, &ma) == 0;
	pthread_mutexattr_destroy(&ma);
	if (!p->mu_ok) {
		PyErr_SetString(PyExc_OSError, "cannot make the pump's mutex");
		goto fail;
	}
	p->spin_ns = spin;
	p->lead_ns = spin; /* until the first oversleeps are seen */
	p->coalesce_ns = coalesce;
	p->warmed_for = -1;
	p->priority = (int)prio;
	p->cpu = (int)cpu;
	p->pwait2 = 1;
	p->neps = (uint32_t)endpoints;
	p->cap_eps = p->neps ? p->neps : 4;
	p->eps = calloc(p->cap_eps, sizeof *p->eps);
	p->core = jc_new(&cfg);
	p->bufs = malloc((size_t)BATCH * SLOT_BYTES);
	p->cmsgs = malloc((size_t)BATCH * CMSG_BYTES);
	p->names = calloc(BATCH, sizeof *p->names);
	p->iov = calloc(BATCH, sizeof *p->iov);
	p->msgs = calloc(BATCH, sizeof *p->msgs);
	p->mp_out = malloc(JASPER_MP_MAX_DELIVERY);
	p->cap_cand = (size_t)hold + (size_t)pending;
	p->cand = malloc(p->cap_cand * sizeof *p->cand);
	p->rec_cap = (size_t)rec_bytes / sizeof(struct pump_record);
	p->rec = p->rec_cap ? malloc(p->rec_cap * sizeof *p->rec) : NULL;
	p->dq_cap = (size_t)dcap;
	p->dq = calloc(p->dq_cap, sizeof *p->dq);
	if (!p->eps || !p->core || !p->bufs || !p->cmsgs || !p->names || !p->iov || !p->msgs ||
	    !p->mp_out || !p->cand || (p->rec_cap && !p->rec) || !p->dq) {
		PyErr_NoMemory();
		goto fail;
	}
	for (uint32_t i = 0; i < p->cap_eps; i++)
		p->eps[i].fd = p->eps[i].out_fd = -1;
	for (int k = 0; k < BATCH; k++) {
		p->iov[k].iov_base = p->bufs + (size_t)k * SLOT_BYTES;
		p->iov[k].iov_len = SLOT_BYTES;
	}
	p->epfd = epoll_create1(EPOLL_CLOEXEC);
	p->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	p->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (p->epfd < 0 || p->wake_fd < 0 || p->notify_fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		goto fail;
	}
	struct epoll_event ev = {.events = EPOLLIN, .data.u32 = WAKE_TAG};
	if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->wake_fd, &ev) != 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		goto fail;
	}
	/* A private loopback socket to warm the send path before a deadline (releasec.py). */
	p->warm_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (p->warm_fd >= 0) {
		socklen_t len = sizeof p->warm_addr;
		p->warm_addr.sin_family = AF_INET;
		p->warm_addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (bind(p->warm_fd, (struct sockaddr *)&p->warm_addr, sizeof p->warm_addr) != 0 ||
		    getsockname(p->warm_fd, (struct sockaddr *)&p->warm_addr, &len) != 0)
			close_fd(&p->warm_fd); /* no warming, e.g. a namespace without loopback up */
	}
	p->state = IDLE;
	return (PyObject *)p;
fail:
	Py_DECREF(p);
	return NULL;
}

static int check_socket(int fd)
{
	int type = 0;
	socklen_t len = sizeof type;
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	if (type != SOCK_DGRAM) {
		PyErr_Format(PyExc_ValueError, "fd %d is not a datagram socket", fd);
		return -1;
	}
	return 0;
}

static int get_addr(PyObject *obj, struct sockaddr_storage *ss, socklen_t *len)
{
	char *buf;
	Py_ssize_t n;
	if (PyBytes_AsStringAndSize(obj, &buf, &n) < 0)
		return -1;
	if (n < 0 || (size_t)n > sizeof *ss) {
		PyErr_Format(PyExc_ValueError, "out_addr of %zd bytes exceeds a sockaddr", n);
		return -1;
	}
	memset(ss, 0, sizeof *ss);
	memcpy(ss, buf, (size_t)n);
	*len = (socklen_t)n;
	return 0;
}

static PyObject *pump_add_endpoint(Pump *p, PyObject *args, PyObject *kwds)
{
	static char *names[] = {"index", "fd", "out_fd", "out_addr", NULL};
	PyObject *oi, *ofd, *oout = NULL, *oaddr = NULL;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|OO:add_endpoint", names, &oi, &ofd, &oout,
					 &oaddr))
		return NULL;
	long long index, fd, out_fd = -1;
	struct sockaddr_storage ss;
	socklen_t alen = 0;
	if (check_open(p) || int_in(oi, 0, UINT32_MAX - 2, "index", &index) ||
	    int_in(ofd, 0, INT32_MAX, "fd", &fd) || opt_int(oout, -1, INT32_MAX, "out_fd", &out_fd))
		return NULL;
	if (oaddr && get_addr(oaddr, &ss, &alen))
		return NULL;
	if (check_socket((int)fd))
		return NULL;
	int rfd = dup_fd((int)fd);
	if (rfd < 0)
		return NULL;
	int ofd2 = -1;
	if (out_fd >= 0 && (ofd2 = dup_fd((int)out_fd)) < 0) {
		close(rfd);
		return NULL;
	}
	/* As overlay/kernel.py open_udp does; fail soft (the pump falls back to its clock). */
	int one = 1;
	setsockopt(rfd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one);
	setsockopt(rfd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);

	pthread_mutex_lock(&p->mu);
	const char *err = NULL;
	if ((uint64_t)index > p->neps) {
		err = "index beyond the endpoint count";
	} else if ((uint32_t)index == p->neps) {
		if (p->neps == p->cap_eps) {
			uint32_t cap = p->cap_eps * 2;
			struct endpoint *eps = realloc(p->eps, cap * sizeof *eps);
			if (!eps) {
				err = "no memory";
			} else {
				memset(eps + p->cap_eps, 0, (cap - p->cap_eps) * sizeof *eps);
				for (uint32_t i = p->cap_eps; i < cap; i++)
					eps[i].fd = eps[i].out_fd = -1;
				p->eps = eps;
				p->cap_eps = cap;
			}
		}
		if (!err && p->neps + 1 > jc_endpoints(p->core) &&
		    jc_set_endpoints(p->core, p->neps + 1) != 0)
			err = "the core cannot grow";
		if (!err)
			p->neps++;
	}
	int saved = 0;
	if (!err) {
		struct endpoint *e = &p->eps[index];
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)index};
		if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, rfd, &ev) != 0) {
			saved = errno;
			err = "epoll_ctl";
		} else {
			if (e->fd >= 0) {
				epoll_ctl(p->epfd, EPOLL_CTL_DEL, e->fd, NULL);
				close(e->fd);
			}
			close_fd(&e->out_fd);
			e->fd = rfd;
			e->out_fd = ofd2;
			e->addr = ss;
			e->addr_len = alen;
		}
	}
	pthread_mutex_unlock(&p->mu);
	if (err) {
		close(rfd);
		if (ofd2 >= 0)
			close(ofd2);
		if (saved) {
			errno = saved;
			return PyErr_SetFromErrno(PyExc_OSError);
		}
		PyErr_SetString(PyExc_ValueError, err);
		return NULL;
	}
	wake(p);
	Py_RETURN_NONE;
}

static PyObject *pump_set_deliver(Pump *p, PyObject *args, PyObject *kwds)
{
	static char *names[] = {"index", "out_fd", "out_addr", NULL};
	PyObject *oi, *oout, *oaddr = NULL;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|O:set_deliver", names, &oi, &oout, &oaddr))
		return NULL;
	long long index, out_fd;
	struct sockaddr_storage ss;
	socklen_t alen = 0;
	if (check_open(p) || int_in(oi, 0, UINT32_MAX, "index", &index) ||
	    int_in(oout, OUT_DISCARD, INT32_MAX, "out_fd", &out_fd))
		return NULL;
	if (oaddr && get_addr(oaddr, &ss, &alen))
		return NULL;
	int fd = out_fd == OUT_DISCARD ? OUT_DISCARD : -1;
	if (out_fd >= 0 && (fd = dup_fd((int)out_fd)) < 0)
		return NULL;
	pthread_mutex_lock(&p->mu);
	int bad = (uint64_t)index >= p->neps;
	if (!bad) {
		struct endpoint *e = &p->eps[index];
		close_fd(&e->out_fd);
		e->out_fd = fd;
		e->addr = ss;
		e->addr_len = alen;
	}
	pthread_mutex_unlock(&p->mu);
	if (bad) {
		if (fd >= 0)
			close(fd);
		PyErr_SetString(PyExc_ValueError, "index beyond the endpoint count");
		return NULL;
	}
	Py_RETURN_NONE;
}

static PyObject *pump_set_parents(Pump *p, PyObject *arg)
{
	if (check_open(p))
		return NULL;
	PyObject *seq = PySequence_Fast(arg, "set_parents() takes a list of (ip, port, parent_id)");
	if (!seq)
		return NULL;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
	size_t cap = 8;
	while (cap < (size_t)n * 2)
		cap *= 2;
	struct parent_entry *tab = calloc(cap, sizeof *tab);
	if (!tab) {
		Py_DECREF(seq);
		return PyErr_NoMemory();
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
		const char *ip;
		PyObject *oport, *oid;
		long long port, id;
		struct in_addr a;
		if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "sOO", &ip, &oport, &oid)) {
			if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
				PyErr_Clear();
				PyErr_Format(PyExc_TypeError,
					     "set_parents()[%zd]: expected (ip: str, port: int, id: int)",
					     i);
			}
			goto fail;
		}
		if (int_in(oport, 0, 65535, "port", &port) ||
		    int_in(oid, 0, UINT32_MAX, "parent_id", &id))
			goto fail;
		if (inet_pton(AF_INET, ip, &a) != 1) {
			PyErr_Format(PyExc_ValueError, "set_parents()[%zd]: %s is not an IPv4 address",
				     i, ip);
			goto fail;
		}
		struct parent_entry *e = parent_slot(tab, cap, a.s_addr, (uint16_t)port);
		e->used = 1;
		e->ip = a.s_addr;
		e->port = (uint16_t)port;
		e->id = (uint32_t)id;
	}
	Py_DECREF(seq);
	pthread_mutex_lock(&p->mu);
	struct parent_entry *old = p->ptab;
	p->ptab = tab;
	p->pcap = cap;
	pthread_mutex_unlock(&p->mu);
	free(old);
	Py_RETURN_NONE;
fail:
	Py_DECREF(seq);
	free(tab);
	return NULL;
}

/* One stream of set_streams, parsed before the lock is taken. */
struct stream_rule {
	uint32_t id, session;
	int nkeys; /* -1: unauthenticated */
	int has_session;
	struct jc_stream_key keys[JC_MAX_KEYS];
};

static int parse_stream_rule(PyObject *item, Py_ssize_t i, struct stream_rule *r)
{
	PyObject *oid, *okeys, *osession;
	if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "OOO", &oid, &okeys, &osession)) {
		PyErr_Clear();
		PyErr_Format(PyExc_TypeError,
			     "set_streams()[%zd]: expected (stream_id, keys: {epoch: key} | None, "
			     "session: int | None)", i);
		return -1;
	}
	long long id, session = 0;
	if (int_in(oid, 0, UINT32_MAX, "stream", &id) ||
	    (osession != Py_None && int_in(osession, 0, UINT32_MAX, "session", &session)))
		return -1;
	r->id = (uint32_t)id;
	r->session = (uint32_t)session;
	r->has_session = osession != Py_None;
	r->nkeys = -1;
	if (okeys == Py_None)
		return 0;
	PyObject *items = PyMapping_Items(okeys);
	if (!items)
		return -1;
	Py_ssize_t n = PyList_GET_SIZE(items);
	if (n > JC_MAX_KEYS) {
		Py_DECREF(items);
		PyErr_Format(PyExc_ValueError, "stream %u: at most %d keys, got %zd", r->id,
			     JC_MAX_KEYS, n);
		return -1;
	}
	r->nkeys = 0;
	for (Py_ssize_t k = 0; k < n; k++) {
		PyObject *pair = PyList_GET_ITEM(items, k);
		long long epoch;
		Py_buffer view;
		if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
			Py_DECREF(items);
			PyErr_SetString(PyExc_TypeError, "keys.items() must give (epoch, key) pairs");
			return -1;
		}
		if (int_in(PyTuple_GET_ITEM(pair, 0), 1, UINT32_MAX, "key epoch", &epoch) ||
		    PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 1), &view, PyBUF_SIMPLE) < 0) {
			Py_DECREF(items);
			return -1;
		}
		int ok = view.len == JC_KEY_LEN;
		if (ok)
			memcpy(r->keys[k].key, view.buf, JC_KEY_LEN);
		PyBuffer_Release(&view);
		if (!ok) {
			Py_DECREF(items);
			PyErr_Format(PyExc_ValueError, "a stream key has %d bytes", JC_KEY_LEN);
			return -1;
		}
		r->keys[k].epoch = (uint32_t)epoch;
		r->nkeys++;
	}
	Py_DECREF(items);
	return 0;
}

static PyObject *pump_set_streams(Pump *p, PyObject *arg)
{
	if (check_open(p))
		return NULL;
	PyObject *seq = PySequence_Fast(arg, "set_streams() takes a list of (id, keys, session)");
	if (!seq)
		return NULL;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
	struct stream_rule *rules = calloc(n ? (size_t)n : 1, sizeof *rules);
	uint32_t *ids = malloc((n ? (size_t)n : 1) * sizeof *ids);
	PyObject *ret = NULL;
	if (!rules || !ids) {
		PyErr_NoMemory();
		goto out;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (parse_stream_rule(PySequence_Fast_GET_ITEM(seq, i), i, &rules[i]))
			goto out;
		ids[i] = rules[i].id;
	}
	int rc = 0;
	pthread_mutex_lock(&p->mu);
	/* Streams of the last plan that this one no longer names are refused from now on. */
	for (size_t j = 0; j < p->nstreams; j++) {
		Py_ssize_t i = 0;
		while (i < n && ids[i] != p->streams[j])
			i++;
		if (i == n)
			jc_drop_stream(p->core, p->streams[j]);
	}
	for (Py_ssize_t i = 0; i < n && !rc; i++) {
		struct stream_rule *r = &rules[i];
		rc = jc_set_stream(p->core, r->id, r->keys, r->nkeys, r->has_session, r->session);
	}
	uint32_t *old = p->streams;
	p->streams = ids;
	p->nstreams = (size_t)n;
	ids = old;
	pthread_mutex_unlock(&p->mu);
	if (rc) {
		PyErr_Format(rc == JC_EINVAL ? PyExc_ValueError : PyExc_RuntimeError,
			     "set_streams: the core refused a stream (%d)", rc);
		goto out;
	}
	ret = Py_NewRef(Py_None);
out:
	if (rules)
		OPENSSL_cleanse(rules, (n ? (size_t)n : 1) * sizeof *rules);
	free(rules);
	free(ids);
	Py_DECREF(seq);
	return ret;
}

/* A jasper.recovery.RecoveryConfig as the core's (attributes read once; ValueError outside
 * what jc_set_recovery takes). */
static int recovery_of(PyObject *obj, struct jc_recovery *out)
{
	static const char *const names[] = {"nak_delay_ns", "nak_jitter_ns", "retry_ns",
					    "attempts",     "max_gaps",	     "seed"};
	uint64_t v[6];
	for (int i = 0; i < 6; i++) {
		PyObject *a = PyObject_GetAttrString(obj, names[i]);
		if (!a)
			return -1;
		v[i] = PyLong_AsUnsignedLongLong(a);
		Py_DECREF(a);
		if (v[i] == (uint64_t)-1 && PyErr_Occurred()) {
			PyErr_Format(PyExc_ValueError, "recovery.%s must be in 0..2^64-1", names[i]);
			return -1;
		}
	}
	*out = (struct jc_recovery){
		.nak_delay_ns = v[0], .nak_jitter_ns = v[1], .retry_ns = v[2],
		.attempts = v[3] > UINT32_MAX ? 0 : (uint32_t)v[3],
		.max_gaps = v[4] > UINT32_MAX ? 0 : (uint32_t)v[4], .seed = v[5],
	};
	return 0;
}

static PyObject *pump_set_recovery(Pump *p, PyObject *args)
{
	PyObject *config, *dests;
	if (!PyArg_ParseTuple(args, "OO:set_recovery", &config, &dests) || check_open(p))
		return NULL;
	struct jc_recovery rc;
	if (config != Py_None && recovery_of(config, &rc) < 0)
		return NULL;
	PyObject *seq = PySequence_Fast(dests, "set_recovery() takes a list of (stream, ip, port)");
	if (!seq)
		return NULL;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
	struct nak_dest *tab = calloc(n ? (size_t)n : 1, sizeof *tab);
	if (!tab) {
		Py_DECREF(seq);
		return PyErr_NoMemory();
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *item = PySequence_Fast_GET_ITEM(seq, i), *ostream, *oport;
		const char *ip;
		long long stream, port;
		if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "OsO", &ostream, &ip, &oport)) {
			PyErr_Clear();
			PyErr_Format(PyExc_TypeError,
				     "set_recovery()[%zd]: expected (stream: int, ip: str, port: int)", i);
			goto fail;
		}
		if (int_in(ostream, 0, UINT32_MAX, "stream", &stream) ||
		    int_in(oport, 1, 65535, "port", &port))
			goto fail;
		tab[i].stream_id = (uint32_t)stream;
		tab[i].addr.sin_family = AF_INET;
		tab[i].addr.sin_port = htons((uint16_t)port);
		if (inet_pton(AF_INET, ip, &tab[i].addr.sin_addr) != 1) {
			PyErr_Format(PyExc_ValueError, "set_recovery()[%zd]: %s is not an IPv4 address",
				     i, ip);
			goto fail;
		}
	}
	Py_DECREF(seq);
	pthread_mutex_lock(&p->mu);
	int rc2 = jc_set_recovery(p->core, config == Py_None ? NULL : &rc);
	struct nak_dest *old = NULL;
	if (rc2 == 0) {
		old = p->nak_dests;
		p->nak_dests = tab;
		p->nnak_dests = (size_t)n;
		tab = NULL;
	}
	pthread_mutex_unlock(&p->mu);
	free(old);
	free(tab);
	if (rc2) {
		PyErr_SetString(PyExc_ValueError,
				"set_recovery: attempts 1..65535, max_gaps 1..2^20, nak_delay_ns + "
				"nak_jitter_ns and retry_ns + nak_jitter_ns at most 2^62");
		return NULL;
	}
	wake(p); /* the schedule may want the thread earlier than it planned */
	Py_RETURN_NONE;
fail:
	Py_DECREF(seq);
	free(tab);
	return NULL;
}

static int get_float(PyObject *obj, double lo, double hi, const char *what, double *out)
{
	if (!obj)
		return 0;
	double v = PyFloat_AsDouble(obj);
	if (v == -1.0 && PyErr_Occurred())
		return -1;
	if (!(v >= lo && v <= hi)) {
		PyErr_Format(PyExc_ValueError, "%s %R out of range %g..%g", what, obj, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

static PyObject *pump_set_link_model(Pump *p, PyObject *args, PyObject *kwds)
{
	static char *names[] = {"",	     "median_ns", "p99_ns", "spike_prob", "spike_min_ns",
				"spike_max_ns", "loss",	     "seed",   "factors",    NULL};
	PyObject *model = Py_None, *o[8] = {NULL};
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O$OOOOOOOO:set_link_model", names, &model,
					 &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7]))
		return NULL;
	if (check_open(p))
		return NULL;
	if (model != Py_None) {
		PyErr_SetString(PyExc_TypeError,
				"set_link_model(None) turns the model off; give it by keywords");
		return NULL;
	}
	struct linkmodel m = {0};
	if (o[0]) {
		long long median, p99 = 150000, smin = 500000, smax = 2000000;
		unsigned long long seed = 1;
		double sprob = 0.0, loss = 0.0;
		if (int_in(o[0], 1, INT64_MAX, "median_ns", &median) ||
		    opt_int(o[1], 1, INT64_MAX, "p99_ns", &p99) ||
		    opt_int(o[3], 0, INT64_MAX, "spike_min_ns", &smin) ||
		    opt_int(o[4], 0, INT64_MAX, "spike_max_ns", &smax) ||
		    get_float(o[2], 0.0, 1.0, "spike_prob", &sprob) ||
		    get_float(o[5], 0.0, 1.0, "loss", &loss))
			return NULL;
		if (o[6]) {
			seed = PyLong_AsUnsignedLongLongMask(o[6]); /* any int: its low 64 bits */
			if (seed == (unsigned long long)-1 && PyErr_Occurred())
				return NULL;
		}
		if (p99 < median) {
			PyErr_SetString(PyExc_ValueError, "p99_ns is below median_ns");
			return NULL;
		}
		if (smax < smin) {
			PyErr_SetString(PyExc_ValueError, "spike_max_ns is below spike_min_ns");
			return NULL;
		}
		m.on = 1;
		m.mu = log((double)median);
		m.sigma = log((double)p99 / (double)median) / 2.3263478740408408;
		m.spike_prob = sprob;
		m.spike_min = (double)smin;
		m.spike_max = (double)smax;
		m.loss = loss;
		m.seed = seed;
		m.shared.factor = 1.0;
		link_seed(&m.shared, seed, UINT32_MAX, UINT32_MAX);
		if (o[7] && o[7] != Py_None) {
			if (!PyDict_Check(o[7])) {
				PyErr_SetString(PyExc_TypeError,
						"factors: a dict {(parent_id, endpoint): float}");
				return NULL;
			}
			PyObject *key, *val;
			Py_ssize_t pos = 0;
			uint64_t overflow = 0;
			while (PyDict_Next(o[7], &pos, &key, &val)) {
				PyObject *op, *oe;
				long long par, ep;
				double f;
				if (!PyTuple_Check(key) || !PyArg_ParseTuple(key, "OO", &op, &oe)) {
					PyErr_Clear();
					PyErr_SetString(PyExc_TypeError,
							"factors: keys are (parent_id, endpoint)");
					goto fail;
				}
				if (int_in(op, 0, UINT32_MAX, "factor parent_id", &par) ||
				    int_in(oe, 0, UINT32_MAX, "factor endpoint", &ep) ||
				    get_float(val, 0.0, 1e9, "factor", &f))
					goto fail;
				struct link *l = link_get(&m, (uint32_t)par, (uint32_t)ep, &overflow);
				if (l == &m.shared) {
					PyErr_SetString(PyExc_ValueError, "factors: too many links");
					goto fail;
				}
				l->factor = f;
			}
		}
	} else {
		for (int i = 1; i < 8; i++)
			if (o[i] && o[i] != Py_None) {
				PyErr_SetString(PyExc_TypeError, "set_link_model() needs median_ns=");
				return NULL;
			}
	}
	pthread_mutex_lock(&p->mu);
	struct linkmodel old = p->lm;
	p->lm = m;
	pthread_mutex_unlock(&p->mu);
	link_free(&old);
	Py_RETURN_NONE;
fail:
	link_free(&m);
	return NULL;
}

/* Parse one tuple of ints/floats: "II" style by hand, for clear messages. */
static PyObject *tuple_item(PyObject *seq, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi,
			    const char *what)
{
	PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
	if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < lo || PyTuple_GET_SIZE(item) > hi) {
		PyErr_Format(PyExc_TypeError, "%s[%zd]: expected a tuple of %zd..%zd items", what, i,
			     lo, hi);
		return NULL;
	}
	return item;
}

static int get_key(PyObject *obj, uint64_t *out)
{
	unsigned long long v = PyLong_AsUnsignedLongLongMask(obj); /* any int: its low 64 bits */
	if (v == (unsigned long long)-1 && PyErr_Occurred())
		return -1;
	*out = v;
	return 0;
}

static PyObject *pump_set_path_model(Pump *p, PyObject *args, PyObject *kwds)
{
	static char *names[] = {"", "publisher", "nodes", "edges", "endpoints", NULL};
	PyObject *off = Py_None, *opub = NULL, *onodes = NULL, *oedges = NULL, *oeps = NULL;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O$OOOO:set_path_model", names, &off, &opub,
					 &onodes, &oedges, &oeps))
		return NULL;
	if (check_open(p))
		return NULL;
	if (off != Py_None) {
		PyErr_SetString(PyExc_TypeError,
				"set_path_model(None) turns the model off; give it by keywords");
		return NULL;
	}
	struct pathmodel pm = {0};
	PyObject *nodes = NULL, *edges = NULL, *eps = NULL;
	uint32_t *deg = NULL;
	if (opub || onodes || oedges || oeps) {
		long long pub;
		if (!opub || !onodes || !oedges || !oeps) {
			PyErr_SetString(PyExc_TypeError,
					"set_path_model() needs publisher=, nodes=, edges= and endpoints=");
			return NULL;
		}
		if (int_in(opub, 0, UINT32_MAX, "publisher", &pub))
			return NULL;
		nodes = PySequence_Fast(onodes, "nodes: a list of (id, key, factor)");
		edges = nodes ? PySequence_Fast(oedges, "edges: a list of (src_id, dst_id[, loss])")
			      : NULL;
		eps = edges ? PySequence_Fast(oeps, "endpoints: a list of (index, key, factor)")
			    : NULL;
		if (!eps)
			goto fail;
		Py_ssize_t nn = PySequence_Fast_GET_SIZE(nodes), ne = PySequence_Fast_GET_SIZE(edges),
			   nx = PySequence_Fast_GET_SIZE(eps);
		if (nn < 1 || (size_t)nn > PATH_MAX_NODES || (size_t)ne > PATH_MAX_EDGES ||
		    (size_t)nx > PATH_MAX_NODES) {
			PyErr_Format(PyExc_ValueError,
				     "path model: 1..%u nodes, up to %u edges and %u endpoints",
				     PATH_MAX_NODES, PATH_MAX_EDGES, PATH_MAX_NODES);
			goto fail;
		}
		pm.nnodes = (uint32_t)nn;
		pm.icap = 8;
		while (pm.icap < (size_t)nn * 2)
			pm.icap *= 2;
		pm.nodes = calloc((size_t)nn, sizeof *pm.nodes);
		pm.index = calloc(pm.icap, sizeof *pm.index);
		pm.in = calloc(ne ? (size_t)ne : 1, sizeof *pm.in);
		pm.memo = calloc(PATH_MEMO, sizeof *pm.memo);
		deg = calloc((size_t)nn + 1, sizeof *deg);
		if (!pm.nodes || !pm.index || !pm.in || !pm.memo || !deg) {
			PyErr_NoMemory();
			goto fail;
		}
		for (Py_ssize_t i = 0; i < nn; i++) {
			PyObject *t = tuple_item(nodes, i, 3, 3, "nodes");
			long long id;
			double f;
			if (!t || int_in(PyTuple_GET_ITEM(t, 0), 0, UINT32_MAX, "node id", &id) ||
			    get_key(PyTuple_GET_ITEM(t, 1), &pm.nodes[i].key) ||
			    get_float(PyTuple_GET_ITEM(t, 2), 0.0, 1e9, "node factor", &f))
				goto fail;
			if (path_lookup(&pm, (uint32_t)id) >= 0) {
				PyErr_Format(PyExc_ValueError, "nodes[%zd]: id %lld twice", i, id);
				goto fail;
			}
			pm.nodes[i].id = (uint32_t)id;
			pm.nodes[i].factor = f;
			size_t k = path_id_hash((uint32_t)id) & (pm.icap - 1);
			while (pm.index[k])
				k = (k + 1) & (pm.icap - 1);
			pm.index[k] = (uint32_t)i + 1;
		}
		int64_t pi = path_lookup(&pm, (uint32_t)pub);
		if (pi < 0) {
			PyErr_SetString(PyExc_ValueError, "publisher: not among the nodes");
			goto fail;
		}
		pm.publisher = (uint32_t)pi;
		/* Two passes over the edges: count senders per node, then place them. */
		for (int pass = 0; pass < 2; pass++) {
			if (pass == 1) {
				uint32_t at = 0;
				for (uint32_t i = 0; i < pm.nnodes; i++) {
					pm.nodes[i].first_in = at;
					at += deg[i];
					deg[i] = 0;
				}
			}
			for (Py_ssize_t i = 0; i < ne; i++) {
				PyObject *t = tuple_item(edges, i, 2, 3, "edges");
				long long src, dst;
				double loss = -1.0;
				if (!t || int_in(PyTuple_GET_ITEM(t, 0), 0, UINT32_MAX, "edge src", &src) ||
				    int_in(PyTuple_GET_ITEM(t, 1), 0, UINT32_MAX, "edge dst", &dst) ||
				    (PyTuple_GET_SIZE(t) == 3 && PyTuple_GET_ITEM(t, 2) != Py_None &&
				     get_float(PyTuple_GET_ITEM(t, 2), 0.0, 1.0, "edge loss", &loss)))
					goto fail;
				int64_t si = path_lookup(&pm, (uint32_t)src),
					di = path_lookup(&pm, (uint32_t)dst);
				if (si < 0 || di < 0) {
					PyErr_Format(PyExc_ValueError, "edges[%zd]: unknown node id", i);
					goto fail;
				}
				if (pass == 0) {
					deg[di]++;
				} else {
					struct path_node *n = &pm.nodes[di];
					pm.in[n->first_in + deg[di]++] =
						(struct path_in){.src = (uint32_t)si, .loss = loss};
					n->n_in = deg[di];
				}
			}
		}
		pm.nin = (uint32_t)ne;
		for (Py_ssize_t i = 0; i < nx; i++) {
			PyObject *t = tuple_item(eps, i, 3, 3, "endpoints");
			long long idx;
			uint64_t key;
			double f;
			if (!t ||
			    int_in(PyTuple_GET_ITEM(t, 0), 0, PATH_MAX_NODES - 1, "endpoint", &idx) ||
			    get_key(PyTuple_GET_ITEM(t, 1), &key) ||
			    get_float(PyTuple_GET_ITEM(t, 2), 0.0, 1e9, "endpoint factor", &f))
				goto fail;
			if ((uint32_t)idx >= pm.neps) {
				uint32_t n = (uint32_t)idx + 1;
				struct path_endpoint *grown = realloc(pm.eps, n * sizeof *grown);
				if (!grown) {
					PyErr_NoMemory();
					goto fail;
				}
				memset(grown + pm.neps, 0, (n - pm.neps) * sizeof *grown);
				pm.eps = grown;
				pm.neps = n;
			}
			pm.eps[idx] = (struct path_endpoint){.key = key, .factor = f, .known = 1};
		}
		pm.on = 1;
	}
	Py_XDECREF(nodes);
	Py_XDECREF(edges);
	Py_XDECREF(eps);
	free(deg);
	pthread_mutex_lock(&p->mu);
	struct pathmodel old = p->pm;
	p->pm = pm;
	pthread_mutex_unlock(&p->mu);
	path_free(&old);
	Py_RETURN_NONE;
fail:
	Py_XDECREF(nodes);
	Py_XDECREF(edges);
	Py_XDECREF(eps);
	free(deg);
	path_free(&pm);
	return NULL;
}

/* The test hooks: what the pump thread would compute, under its lock. */
static PyObject *path_query(Pump *p, PyObject *args, int arrival)
{
	unsigned int who, endpoint = 0, stream, session;
	unsigned long long seq;
	long long send;
	int heartbeat = 0;
	int ok = arrival ? PyArg_ParseTuple(args, "IIIIKL|p:path_arrival", &who, &endpoint, &stream,
					    &session, &seq, &send, &heartbeat)
			 : PyArg_ParseTuple(args, "IIIKL:path_forward", &who, &stream, &session, &seq,
					    &send);
	if (!ok || check_open(p))
		return NULL;
	int64_t t = 0;
	int r;
	pthread_mutex_lock(&p->mu);
	if (!p->pm.on || !p->lm.on) {
		r = -2;
	} else if (arrival) {
		r = path_arrival_of(&p->pm, &p->lm, who, endpoint, stream, session, seq, send,
				    heartbeat, &t, &p->pst);
	} else {
		int64_t node = path_lookup(&p->pm, who);
		r = -1;
		if (node >= 0) {
			t = path_forward_time(&p->pm, &p->lm, (uint32_t)node, stream, session, seq,
					      datagram_key(stream, session, seq), send, 0, &p->pst);
			r = t != PATH_NEVER;
		}
	}
	pthread_mutex_unlock(&p->mu);
	if (r == -2) {
		PyErr_SetString(PyExc_ValueError, "the path model (or the link model) is off");
		return NULL;
	}
	if (r < 0) {
		PyErr_SetString(PyExc_ValueError, "unknown node or endpoint");
		return NULL;
	}
	if (r == 0)
		Py_RETURN_NONE;
	return PyLong_FromLongLong(t);
}

static PyObject *pump_path_arrival(Pump *p, PyObject *args)
{
	return path_query(p, args, 1);
}

static PyObject *pump_path_forward(Pump *p, PyObject *args)
{
	return path_query(p, args, 0);
}

static PyObject *pump_set_clock_offset(Pump *p, PyObject *arg)
{
	long long off;
	if (check_open(p) || int_in(arg, -((long long)1 << 62), (long long)1 << 62, "offset", &off))
		return NULL;
	pthread_mutex_lock(&p->mu);
	p->offset = off;
	pthread_mutex_unlock(&p->mu);
	wake(p);
	Py_RETURN_NONE;
}

static PyObject *pump_start(Pump *p, PyObject *Py_UNUSED(ignored))
{
	if (check_open(p))
		return NULL;
	if (p->state != IDLE) {
		PyErr_SetString(PyExc_RuntimeError, "ReceivePump already started");
		return NULL;
	}
	/* The thread takes no signals: Python handles them in its main thread. */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_mutex_lock(&p->mu);
	p->state = RUNNING;
	int rc = pthread_create(&p->thread, NULL, pump_run, p);
	if (rc != 0)
		p->state = IDLE;
	pthread_mutex_unlock(&p->mu);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (rc != 0) {
		errno = rc;
		return PyErr_SetFromErrno(PyExc_OSError);
	}
	Py_RETURN_NONE;
}

static PyObject *pump_stop(Pump *p, PyObject *args, PyObject *kwds)
{
	static char *names[] = {"drain", "timeout_s", NULL};
	int drain = 1;
	double timeout = 5.0;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$pd:stop", names, &drain, &timeout))
		return NULL;
	if (check_open(p))
		return NULL;
	if (!(timeout >= 0.0) || timeout > 1e6) {
		PyErr_SetString(PyExc_ValueError, "timeout_s out of range 0..1e6");
		return NULL;
	}
	if (p->state != RUNNING) {
		if (p->state == IDLE)
			p->state = STOPPED;
		return PyLong_FromUnsignedLongLong(p->flushed);
	}
	pthread_mutex_lock(&p->mu);
	p->state = STOPPING;
	p->drain = drain;
	p->stop_until = realtime_ns() + (int64_t)(timeout * 1e9);
	pthread_mutex_unlock(&p->mu);
	wake(p);
	join_thread(p);
	p->state = STOPPED;
	return PyLong_FromUnsignedLongLong(p->flushed);
}

static PyObject *pump_close(Pump *p, PyObject *Py_UNUSED(ignored))
{
	if (p->joining) {
		/* stop() runs in another thread (a method call keeps the object alive, so dealloc
		 * never meets this): joining the thread twice is undefined. */
		PyErr_SetString(PyExc_RuntimeError, "stop() is running in another thread");
		return NULL;
	}
	if (p->state != CLOSED)
		pump_release_all(p);
	Py_RETURN_NONE;
}

static PyObject *pump_take_records(Pump *p, PyObject *Py_UNUSED(ignored))
{
	if (check_open(p))
		return NULL;
	const size_t size = sizeof(struct pump_record);
	pthread_mutex_lock(&p->mu);
	size_t n = p->rec_len;
	PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * size));
	if (out) {
		char *dst = PyBytes_AS_STRING(out);
		size_t first = p->rec_cap - p->rec_head < n ? p->rec_cap - p->rec_head : n;
		if (first)
			memcpy(dst, &p->rec[p->rec_head], first * size);
		if (n > first)
			memcpy(dst + first * size, p->rec, (n - first) * size);
		p->rec_head = p->rec_cap ? (p->rec_head + n) % p->rec_cap : 0;
		p->rec_len = 0;
	}
	pthread_mutex_unlock(&p->mu);
	return out;
}

static PyObject *pump_take_deliveries(Pump *p, PyObject *Py_UNUSED(ignored))
{
	if (check_open(p))
		return NULL;
	pthread_mutex_lock(&p->mu);
	/* Clear the signal first, under the lock the thread signals under: no lost wake-up. */
	uint64_t v;
	ssize_t rc = read(p->notify_fd, &v, sizeof v);
	(void)rc;
	size_t n = p->dq_len;
	struct delivery *items = n ? malloc(n * sizeof *items) : NULL;
	if (n && !items) {
		pthread_mutex_unlock(&p->mu);
		return PyErr_NoMemory();
	}
	for (size_t i = 0; i < n; i++)
		items[i] = p->dq[(p->dq_head + i) % p->dq_cap];
	p->dq_head = (p->dq_head + n) % p->dq_cap;
	p->dq_len = 0;
	pthread_mutex_unlock(&p->mu);
	PyObject *list = PyList_New((Py_ssize_t)n);
	for (size_t i = 0; list && i < n; i++) {
		struct delivery *d = &items[i];
		PyObject *t = Py_BuildValue("(IIIKHBLLy#B)", d->endpoint, d->stream_id, d->session,
					    (unsigned long long)d->seq, d->count, d->kind,
					    (long long)d->deadline_ns, (long long)d->handed_ns,
					    (const char *)d->payload, (Py_ssize_t)d->len, d->mp_flags);
		if (!t)
			Py_CLEAR(list);
		else
			PyList_SET_ITEM(list, (Py_ssize_t)i, t);
	}
	for (size_t i = 0; i < n; i++)
		free(items[i].payload);
	free(items);
	return list;
}

/* A snapshot of one endpoint for counters(), taken under the lock. */
struct ep_snapshot {
	struct jc_counters c;
	struct jc_parent parents[JC_PARENT_SLOTS];
	int nparents;
	struct endpoint e;
};

static int set_u64(PyObject *d, const char *key, uint64_t v)
{
	PyObject *o = PyLong_FromUnsignedLongLong(v);
	if (!o)
		return -1;
	int rc = PyDict_SetItemString(d, key, o);
	Py_DECREF(o);
	return rc;
}

static const char *errno_name(int err, char *buf, size_t size)
{
	const char *name = strerrorname_np(err);
	if (name)
		return name;
	snprintf(buf, size, "E%d", err);
	return buf;
}

static PyObject *endpoint_dict(const struct ep_snapshot *s)
{
	PyObject *d = PyDict_New();
	if (!d)
		return NULL;
	const struct jc_counters *c = &s->c;
	const char *keys[] = {"received", "heartbeats", "accepted",	"duplicates",
			      "stale",	  "released",	"late",		"hold_overflow",
			      "pending_overflow", "gaps", "gap_messages", "nomem"};
	const uint64_t vals[] = {c->received, c->heartbeats, c->accepted, c->duplicates,
				 c->stale,    c->released,   c->late,	  c->hold_overflow,
				 c->pending_overflow, c->gaps, c->gap_messages, c->nomem};
	for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
		if (set_u64(d, keys[i], vals[i]))
			goto fail;
	for (int i = 0; i < JC_MALFORMED_REASONS; i++) {
		char key[64];
		snprintf(key, sizeof key, "malformed_%s", jc_malformed_reason[i]);
		if (set_u64(d, key, c->malformed[i]))
			goto fail;
	}
	for (int i = 0; i < JC_REJECT_REASONS; i++) {
		char key[64];
		snprintf(key, sizeof key, "rejected_%s", jc_reject_reason[i]);
		if (set_u64(d, key, c->rejected[i]))
			goto fail;
	}
	if (set_u64(d, "naks_sent", c->naks_sent) || set_u64(d, "naks_coalesced", c->naks_coalesced) ||
	    set_u64(d, "recovered", c->recovered) || set_u64(d, "recovered_late", c->recovered_late) ||
	    set_u64(d, "unrecoverable", c->unrecoverable) ||
	    set_u64(d, "nak_errors", s->e.nak_errors))
		goto fail;
	if (set_u64(d, "kernel_drops", s->e.kernel_drops) ||
	    set_u64(d, "truncated", s->e.truncated) || set_u64(d, "link_lost", s->e.link_lost) ||
	    set_u64(d, "delivered", s->e.delivered) || set_u64(d, "recv_errors", s->e.recv_errors))
		goto fail;
	PyObject *errs = PyDict_New();
	if (!errs || PyDict_SetItemString(d, "deliver_errors", errs) < 0) {
		Py_XDECREF(errs);
		goto fail;
	}
	Py_DECREF(errs); /* d holds it */
	for (int i = 0; i < ERRNO_SLOTS && s->e.errs[i].n; i++) {
		char buf[32];
		if (set_u64(errs, errno_name(s->e.errs[i].err, buf, sizeof buf), s->e.errs[i].n))
			goto fail;
	}
	if (s->e.errs_other && set_u64(errs, "other", s->e.errs_other))
		goto fail;
	PyObject *parents = PyDict_New();
	if (!parents || PyDict_SetItemString(d, "parents", parents) < 0) {
		Py_XDECREF(parents);
		goto fail;
	}
	Py_DECREF(parents);
	for (int i = 0; i < s->nparents; i++) {
		PyObject *k = PyLong_FromUnsignedLong(s->parents[i].id);
		PyObject *v = Py_BuildValue("(KK)", (unsigned long long)s->parents[i].copies,
					    (unsigned long long)s->parents[i].kept);
		int rc = k && v ? PyDict_SetItem(parents, k, v) : -1;
		Py_XDECREF(k);
		Py_XDECREF(v);
		if (rc < 0)
			goto fail;
	}
	return d;
fail:
	Py_DECREF(d);
	return NULL;
}

static PyObject *pump_counters(Pump *p, PyObject *Py_UNUSED(ignored))
{
	if (check_open(p))
		return NULL;
	pthread_mutex_lock(&p->mu);
	uint32_t n = p->neps;
	struct ep_snapshot *snap = n ? calloc(n, sizeof *snap) : NULL;
	if (n && !snap) {
		pthread_mutex_unlock(&p->mu);
		return PyErr_NoMemory();
	}
	for (uint32_t i = 0; i < n; i++) {
		jc_counters(p->core, i, &snap[i].c);
		int k = jc_parents(p->core, i, snap[i].parents, JC_PARENT_SLOTS);
		snap[i].nparents = k > 0 ? k : 0;
		snap[i].e = p->eps[i];
	}
	uint64_t totals[] = {p->recv_calls,	   p->datagrams,	p->batches,
			     p->link_lost,	   p->link_overflow,	p->records_dropped,
			     p->deliveries_dropped, p->truncated,	p->wakeups,
			     p->warmups,	   jc_held(p->core),	jc_pending(p->core),
			     jc_clamped(p->core),  p->flushed,		p->rec_len,
			     p->dq_len,		   p->rounds,		p->coalesced,
			     p->spins,		   p->spin_total_ns,	p->late_wakes,
			     (uint64_t)p->lead_ns, p->rounds_cut,	p->path_copies,
			     p->path_floored,	   p->pst.memo_hits,	p->pst.memo_misses,
			     p->pst.too_deep,	   p->naks_sent,	p->naks_unaddressed,
			     p->nak_errors,	   jc_open_gaps(p->core)};
	const char *tkeys[] = {"recv_calls",	     "datagrams",     "batches",
			       "link_lost",	     "link_overflow", "records_dropped",
			       "deliveries_dropped", "truncated",     "wakeups",
			       "warmups",	     "held",	      "pending",
			       "clamped",	     "flushed",	      "records_waiting",
			       "deliveries_waiting", "rounds",	      "coalesced",
			       "spins",		     "spin_ns",	      "late_wakes",
			       "lead_ns",	     "rounds_cut",    "path_copies",
			       "path_floored",	     "path_memo_hits", "path_memo_misses",
			       "path_too_deep",	     "naks_sent",      "naks_unaddressed",
			       "nak_errors",	     "open_gaps"};
	int realtime = p->realtime_ok, pinned = p->pinned, sched_errno = p->sched_errno,
	    pin_errno = p->pin_errno;
	pthread_mutex_unlock(&p->mu);

	PyObject *d = PyDict_New(), *eps = d ? PyList_New(n) : NULL;
	if (!eps)
		goto fail;
	for (size_t i = 0; i < sizeof totals / sizeof totals[0]; i++)
		if (set_u64(d, tkeys[i], totals[i]))
			goto fail;
	if (PyDict_SetItemString(d, "realtime", realtime ? Py_True : Py_False) < 0 ||
	    PyDict_SetItemString(d, "pinned", pinned ? Py_True : Py_False) < 0)
		goto fail;
	char buf[32];
	PyObject *s1 = PyUnicode_FromString(sched_errno ? errno_name(sched_errno, buf, sizeof buf)
							: "");
	int rc = s1 ? PyDict_SetItemString(d, "sched_error", s1) : -1;
	Py_XDECREF(s1);
	if (rc < 0)
		goto fail;
	PyObject *s2 = PyUnicode_FromString(pin_errno ? errno_name(pin_errno, buf, sizeof buf) : "");
	rc = s2 ? PyDict_SetItemString(d, "pin_error", s2) : -1;
	Py_XDECREF(s2);
	if (rc < 0)
		goto fail;
	for (uint32_t i = 0; i < n; i++) {
		PyObject *ed = endpoint_dict(&snap[i]);
		if (!ed)
			goto fail;
		PyList_SET_ITEM(eps, i, ed);
	}
	if (PyDict_SetItemString(d, "endpoints", eps) < 0)
		goto fail;
	Py_DECREF(eps);
	free(snap);
	return d;
fail:
	Py_XDECREF(eps);
	Py_XDECREF(d);
	free(snap);
	return NULL;
}

static PyObject *pump_get_notify_fd(Pump *p, void *Py_UNUSED(closure))
{
	if (check_open(p))
		return NULL;
	return PyLong_FromLong(p->notify_fd);
}

static PyObject *pump_get_held(Pump *p, void *Py_UNUSED(closure))
{
	if (check_open(p))
		return NULL;
	pthread_mutex_lock(&p->mu);
	size_t n = jc_held(p->core);
	pthread_mutex_unlock(&p->mu);
	return PyLong_FromSize_t(n);
}

static PyObject *pump_get_pending(Pump *p, void *Py_UNUSED(closure))
{
	if (check_open(p))
		return NULL;
	pthread_mutex_lock(&p->mu);
	size_t n = jc_pending(p->core);
	pthread_mutex_unlock(&p->mu);
	return PyLong_FromSize_t(n);
}

static PyObject *pump_get_endpoints(Pump *p, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLong(p->neps);
}

static PyObject *pump_get_running(Pump *p, void *Py_UNUSED(closure))
{
	return PyBool_FromLong(p->state == RUNNING);
}

static PyMethodDef pump_methods[] = {
	{"add_endpoint", (PyCFunction)(void (*)(void))pump_add_endpoint,
	 METH_VARARGS | METH_KEYWORDS,
	 "add_endpoint(index, fd, out_fd=-1, out_addr=b'')\n--\n\n"
	 "Receive endpoint `index` on UDP socket `fd` (dup'ed: the caller may close its own);\n"
	 "index == endpoints grows by one, a smaller index replaces that endpoint's sockets.\n"
	 "out_fd -1 delivers in process (take_deliveries), else sendto(out_fd, out_addr)."},
	{"set_deliver", (PyCFunction)(void (*)(void))pump_set_deliver, METH_VARARGS | METH_KEYWORDS,
	 "set_deliver(index, out_fd, out_addr=b'')\n--\n\n"
	 "Where endpoint `index` delivers: out_fd -1 in process, -2 in process with no reader\n"
	 "(stamped and counted, not queued), else a socket (dup'ed) and a\n"
	 "struct sockaddr as bytes (b'' for a connected socket)."},
	{"set_parents", (PyCFunction)pump_set_parents, METH_O,
	 "set_parents(parents, /)\n--\n\n"
	 "[(ip, port, parent_id)]: the parent id of a source; port 0 matches any port of ip;\n"
	 "sources not listed get UNKNOWN_PARENT."},
	{"set_streams", (PyCFunction)pump_set_streams, METH_O,
	 "set_streams(streams, /)\n--\n\n"
	 "[(stream_id, keys, session)] of a plan: the streams the core admits (keys {epoch: key}\n"
	 "or None: unauthenticated; session: the announced one or None); streams of the last\n"
	 "call not named again are dropped. Copies of streams never set are refused."},
	{"set_link_model", (PyCFunction)(void (*)(void))pump_set_link_model,
	 METH_VARARGS | METH_KEYWORDS,
	 "set_link_model(None, /) or set_link_model(*, median_ns, p99_ns=150000, spike_prob=0.0,\n"
	 "spike_min_ns=500000, spike_max_ns=2000000, loss=0.0, seed=1, factors=None)\n--\n\n"
	 "Emulated link delay and loss per (parent, endpoint), as jasper.linkmodel.LinkSampler."},
	{"set_path_model", (PyCFunction)(void (*)(void))pump_set_path_model,
	 METH_VARARGS | METH_KEYWORDS,
	 "set_path_model(None, /) or set_path_model(*, publisher, nodes, edges, endpoints)\n--\n\n"
	 "Emulate every hop of the plan (docs/link-model.md): nodes [(id, key, factor)] for the\n"
	 "publisher and the relays (ids from set_parents' table, keys global), edges\n"
	 "[(src_id, dst_id[, loss])], endpoints [(index, key, factor)]. The link model's\n"
	 "parameters (set_link_model) apply; parents outside the graph get the last hop only."},
	{"path_arrival", (PyCFunction)pump_path_arrival, METH_VARARGS,
	 "path_arrival(parent_id, endpoint, stream, session, seq, send_ns, heartbeat=False, /)\n"
	 "--\n\nThe emulated arrival (kernel clock, before the floor) of that copy, None when\n"
	 "lost (heartbeat: of a heartbeat naming seq, drawn apart from the message's copy)."},
	{"path_forward", (PyCFunction)pump_path_forward, METH_VARARGS,
	 "path_forward(node_id, stream, session, seq, send_ns, /)\n--\n\n"
	 "The emulated time the node forwards the datagram, None when it never does."},
	{"set_recovery", (PyCFunction)pump_set_recovery, METH_VARARGS,
	 "set_recovery(config, naks, /)\n--\n\n"
	 "Loss recovery (docs/recovery.md): config a jasper.recovery.RecoveryConfig (the core's NAK\n"
	 "schedule) or None (off: open ranges are forgotten); naks [(stream_id, ip, port)]: where\n"
	 "each stream's NAKs go (its publisher's port), sent from the endpoint's own socket; NAKs\n"
	 "of other streams are counted naks_unaddressed and not sent."},
	{"set_clock_offset", (PyCFunction)pump_set_clock_offset, METH_O,
	 "set_clock_offset(ns, /)\n--\n\nThe node clock minus CLOCK_REALTIME, in ns."},
	{"start", (PyCFunction)pump_start, METH_NOARGS, "start()\n--\n\nStart the pump thread."},
	{"stop", (PyCFunction)(void (*)(void))pump_stop, METH_VARARGS | METH_KEYWORDS,
	 "stop(*, drain=True, timeout_s=5.0)\n--\n\n"
	 "Stop receiving. With drain: take what the kernel queued, release held entries on time\n"
	 "until none is left or timeout_s passes, then flush the rest at once. Returns how many\n"
	 "entries (held or pending) that final flush released early."},
	{"close", (PyCFunction)pump_close, METH_NOARGS,
	 "close()\n--\n\nStop without draining and free everything (idempotent)."},
	{"take_records", (PyCFunction)pump_take_records, METH_NOARGS,
	 "take_records()\n--\n\nThe release records since the last call (RECORD_SIZE each)."},
	{"take_deliveries", (PyCFunction)pump_take_deliveries, METH_NOARGS,
	 "take_deliveries()\n--\n\n"
	 "In-process deliveries since the last call, oldest first: (endpoint, stream_id,\n"
	 "session, seq, count, kind, deadline_ns, handed_ns, payload, mp_flags); handed_ns is\n"
	 "CLOCK_REALTIME when the pump queued it (the record has the core's release_ns too).\n"
	 "Also clears notify_fd."},
	{"counters", (PyCFunction)pump_counters, METH_NOARGS,
	 "counters()\n--\n\nTotals and a list of per-endpoint counters (see overlay/_datapath.pyi)."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef pump_getset[] = {
	{"notify_fd", (getter)pump_get_notify_fd, NULL,
	 "An eventfd, readable when in-process deliveries wait.", NULL},
	{"held", (getter)pump_get_held, NULL, "Entries the core holds.", NULL},
	{"pending", (getter)pump_get_pending, NULL, "Copies waiting for their emulated arrival.",
	 NULL},
	{"endpoints", (getter)pump_get_endpoints, NULL, "Endpoints.", NULL},
	{"running", (getter)pump_get_running, NULL, "Whether the pump thread runs.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PumpType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "overlay._datapath.ReceivePump",
	.tp_basicsize = sizeof(Pump),
	.tp_dealloc = (destructor)pump_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "ReceivePump(*, endpoints, ring_size=4096, hold_capacity=65536, "
		  "pending_capacity=65536, spin_ns=20000, priority=0, cpu=-1, "
		  "record_capacity=1<<20, delivery_capacity=65536, coalesce_ns=200000)\n--\n\n"
		  "The native receive pump of one receiver process: a thread that receives the\n"
		  "endpoints' copies, runs the receiver core and releases at the deadlines.\n"
		  "record_capacity is in bytes (whole records; 0: no records).",
	.tp_methods = pump_methods,
	.tp_getset = pump_getset,
	.tp_new = pump_new,
};

static PyObject *record_fields(void)
{
	return Py_BuildValue(
		"((ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss)(ss))", "endpoint", "<u4",
		"parent", "<u4", "stream_id", "<u4", "session", "<u4", "seq", "<u8", "count", "<u2",
		"kind", "u1", "ok", "u1", "err", "<u4", "deadline_ns", "<i8", "send_ns", "<i8",
		"arrival_ns", "<i8", "release_ns", "<i8", "handed_ns", "<i8");
}

static struct PyModuleDef datapath_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "overlay._datapath",
	.m_doc = "The native receive pump (native/pump.c): recvmmsg, link-delay sampling, the\n"
		 "receiver core and release sends on a thread without the GIL.",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__datapath(void)
{
	if (PyType_Ready(&PumpType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&datapath_module);
	if (!m)
		return NULL;
	PyObject *fields = record_fields();
	if (PyModule_AddObjectRef(m, "ReceivePump", (PyObject *)&PumpType) < 0 || !fields ||
	    PyModule_AddObjectRef(m, "RECORD_FIELDS", fields) < 0 ||
	    PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(struct pump_record)) < 0 ||
	    PyModule_AddStringConstant(m, "RECORD_FORMAT", RECORD_FORMAT) < 0 ||
	    PyModule_AddStringConstant(m, "RECORD_DOC", RECORD_DOC) < 0 ||
	    PyModule_AddIntConstant(m, "UNKNOWN_PARENT", (long)UNKNOWN_PARENT) < 0 ||
	    PyModule_AddIntConstant(m, "BATCH", BATCH) < 0 ||
	    PyModule_AddIntConstant(m, "SLOT_BYTES", SLOT_BYTES) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM) < 0) {
		Py_XDECREF(fields);
		Py_DECREF(m);
		return NULL;
	}
	Py_DECREF(fields);
	return m;
}
