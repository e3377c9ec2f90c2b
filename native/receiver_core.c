/* receiver_core.c: the receiver core in C11 (docs/receiver-core.md); jasper/receiver_core.py is
 * its specification. No I/O, no clock, no Python. */
#include "receiver_core.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "jasper_mp.h"
#include "jasper_wire.h"

#define MAX_DATAGRAM (JASPER_HEADER_LEN + JASPER_MAX_PAYLOAD)

/* Under ASan a free buffer is poisoned, so a payload read after its release was reclaimed (a
 * broken jc_take_releases promise) is reported like a use after free. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif
#define KNOWN_FLAGS (JASPER_FLAG_HEDGE_COPY | JASPER_FLAG_RETRANSMIT | JASPER_FLAG_HEARTBEAT)
#define AT(field) (__builtin_offsetof(struct jasper_hdr, field))

const char *const jc_malformed_reason[JC_MALFORMED_REASONS] = {
	"short", "magic", "version", "flags", "length", "count", "overrun",
};

const char *const jc_reject_reason[JC_REJECT_REASONS] = {
	"stream", "key", "mac", "session", "ahead",
};

_Static_assert(JC_KEY_LEN == JASPER_KEY_LEN, "stream key length");
_Static_assert(JASPER_MAC_OFFSET + JASPER_MAC_LEN == JASPER_HEADER_LEN, "MAC ends the header");

/* ---- parsing ----------------------------------------------------------------------------- */

/* Host to network byte order for the MP header (the build is -std=c11: no htobe64). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NET16(x) __builtin_bswap16(x)
#define NET32(x) __builtin_bswap32(x)
#define NET64(x) __builtin_bswap64(x)
#else
#define NET16(x) (x)
#define NET32(x) (x)
#define NET64(x) (x)
#endif

static inline uint16_t load16(const uint8_t *p)
{
	return (uint16_t)((uint16_t)p[0] << 8 | p[1]);
}

static inline uint32_t load32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint64_t load64(const uint8_t *p)
{
	return (uint64_t)load32(p) << 32 | load32(p + 4);
}

int jc_parse(const uint8_t *data, size_t n, struct jc_header *h)
{
	if (n < JASPER_HEADER_LEN)
		return JC_MALFORMED_SHORT;
	if (load16(data + AT(magic)) != JASPER_MAGIC)
		return JC_MALFORMED_MAGIC;
	h->version = data[AT(version)];
	if (h->version != JASPER_VERSION)
		return JC_MALFORMED_VERSION;
	h->flags = data[AT(flags)];
	if (h->flags & ~KNOWN_FLAGS)
		return JC_MALFORMED_FLAGS;
	h->payload_len = load16(data + AT(payload_len));
	if (h->payload_len != n - JASPER_HEADER_LEN || h->payload_len > JASPER_MAX_PAYLOAD)
		return JC_MALFORMED_LENGTH;
	h->msg_count = load16(data + AT(msg_count));
	h->stream_id = load32(data + AT(stream_id));
	h->session = load32(data + AT(session));
	h->plan_epoch = load32(data + AT(plan_epoch));
	h->seq = load64(data + AT(seq));
	h->send_time_ns = load64(data + AT(send_time_ns));
	h->deadline_ns = load64(data + AT(deadline_ns));
	h->key_epoch = load32(data + AT(key_epoch));

	/* From here n == JASPER_HEADER_LEN + payload_len <= MAX_DATAGRAM: no sum below overflows. */
	size_t plen = h->payload_len, count = h->msg_count;
	if (h->flags & JASPER_FLAG_HEARTBEAT)
		return count || plen ? JC_MALFORMED_COUNT : JC_PARSE_OK;
	if (count == 0)
		return JC_MALFORMED_COUNT;
	if (count == 1) {
		if (plen < JASPER_BLOCK_HEADER_LEN)
			return JC_MALFORMED_OVERRUN;
		size_t length = load16(data + JASPER_HEADER_LEN);
		if (length > plen - JASPER_BLOCK_HEADER_LEN)
			return JC_MALFORMED_OVERRUN;
		if (length < plen - JASPER_BLOCK_HEADER_LEN)
			return JC_MALFORMED_COUNT;
		return JC_PARSE_OK;
	}
	size_t at = JASPER_HEADER_LEN;
	for (size_t i = 0; i < count; i++) {
		if (at + JASPER_BLOCK_HEADER_LEN > n)
			return JC_MALFORMED_OVERRUN;
		at += JASPER_BLOCK_HEADER_LEN + load16(data + at);
		if (at > n)
			return JC_MALFORMED_OVERRUN;
	}
	return at != n ? JC_MALFORMED_COUNT : JC_PARSE_OK;
}

__extension__ typedef unsigned __int128 u128;

/* ---- pools ------------------------------------------------------------------------------- */

/* A datagram buffer; `next` links it on the free or lent list. */
struct buf {
	struct buf *next;
	uint8_t data[MAX_DATAGRAM];
};

#define BUFS_PER_CHUNK 64

struct buf_chunk {
	struct buf_chunk *next;
	struct buf bufs[BUFS_PER_CHUNK];
};

/* A copy waiting in the pending set or the hold. */
struct copy {
	struct jc_header h; /* valid when reason == 0 */
	int64_t arrival_ns;
	uint64_t deadline_ns; /* in force, when held */
	uint32_t endpoint;
	uint32_t parent;
	uint16_t len; /* bytes in buf */
	uint8_t reason; /* jc_parse result */
	struct buf *buf; /* NULL for malformed copies */
};

struct pending_key {
	int64_t arrival_ns;
	uint64_t order;
	uint32_t slot;
};

struct held_key {
	uint64_t deadline_ns;
	uint64_t seq;
	uint64_t order;
	uint32_t stream_id;
	uint32_t rank;
	uint32_t slot;
};

/* One open range of missing sequence numbers of an endpoint's stream (jasper.recovery._Gap). */
struct gap {
	uint64_t first;
	uint64_t due; /* when it wants its next NAK (or to be given up) */
	uint32_t endpoint, stream_id, session, count;
	uint16_t attempt; /* NAKs sent for it so far */
	bool dead; /* given up by the poll under way */
};

struct gap_ref {
	uint32_t endpoint, stream_id, session, idx;
	uint64_t first;
};

struct nak_range {
	uint64_t first;
	uint32_t count;
	uint16_t attempt;
};

struct release_entry {
	struct jc_release r;
	struct buf *buf;
};

/* Dedup ring of one (endpoint, stream): exactly jasper.dedup.DedupRing. */
struct ring {
	uint32_t session;
	bool has_session;
	uint32_t ahead_run; /* copies refused AHEAD since the last accepted one (saturates) */
	uint64_t highest; /* largest seq accepted in this session, 0: none yet */
	/* Gap tracking in release order (jasper.mp_spec.GapTracker): the next seq expected of
	 * gap_session; none until the first release. */
	bool gap_started;
	uint32_t gap_session;
	uint64_t gap_next;
	/* The NAK schedule's next seq expected of nak_session, in processing order (NakTracker
	 * _expected); 128 bits: a copy ending at 2^64 expects 2^64, as Python's ints do. */
	bool nak_started;
	uint32_t nak_session;
	u128 nak_expected;
	uint64_t slots[];
};

/* A stream id the core has been told about: its clamp floor (kept for the whole core, as
 * ReleaseSchedule does) and, while configured, what it admits. */
struct stream {
	uint32_t id;
	uint64_t floor; /* last held deadline (the clamp's floor), 0 = none */
	bool configured; /* set and not dropped */
	bool keyed; /* copies need a MAC */
	bool has_session; /* only `session` is taken */
	uint8_t nkeys;
	uint32_t session;
	uint32_t epochs[JC_MAX_KEYS];
	EVP_MAC_CTX *mac[JC_MAX_KEYS]; /* keyed HMAC-SHA256, re-initialised per copy */
};

struct endpoint {
	struct jc_counters c;
	struct jc_parent parents[JC_MAX_PARENTS];
	uint32_t nparents;
	bool other_seen;
	struct jc_parent other;
	struct ring **rings; /* by stream index, NULL until used */
	uint32_t rings_cap;
};

struct jc_core {
	struct jc_config cfg;
	uint32_t endpoints;
	struct endpoint *eps;

	/* Streams: an open-addressing table id -> index into streams[]. */
	struct stream *streams;
	uint32_t nstreams, streams_cap;
	uint32_t *table; /* index + 1, 0 = empty */
	uint32_t table_mask;

	/* Copy slots shared by the pending set and the hold. */
	struct copy *slots;
	uint32_t *free_slots; /* stack of unused slot indices */
	uint32_t nslots, nfree_slots;
	size_t slots_cap;

	struct pending_key *pending;
	size_t npending, pending_cap;
	uint64_t receipts;

	struct held_key *held;
	size_t nheld, held_cap;
	uint64_t tiebreak;
	uint64_t clamped;

	struct release_entry *rel;
	size_t rel_head, rel_len, rel_cap;

	struct buf *free_bufs;
	struct buf *lent; /* handed out by the last jc_take_releases */
	struct buf_chunk *chunks;

	EVP_MAC *hmac; /* fetched on the first keyed stream */

	/* Loss recovery (jasper.recovery.NakTracker): open ranges in the Python list's order. */
	bool recovery_on;
	struct jc_recovery rcfg;
	struct gap *gaps;
	size_t ngaps, gaps_cap;
	uint64_t nak_next; /* the smallest due of gaps[], valid when ngaps */
	struct gap_ref *refs; /* poll's scratch: the gaps sorted by (endpoint, stream, ...) */
	struct nak_range *ranges; /* poll's scratch: one NAK's ranges */
	size_t scratch_cap;
	struct jc_nak *naks;
	size_t nak_head, nak_len, nak_cap;

	int status; /* JC_ENOMEM seen during the current call */
};

static struct buf *buf_get(struct jc_core *c)
{
	if (!c->free_bufs) {
		struct buf_chunk *k = malloc(sizeof *k);
		if (!k)
			return NULL;
		k->next = c->chunks;
		c->chunks = k;
		for (size_t i = 0; i < BUFS_PER_CHUNK; i++) {
			k->bufs[i].next = c->free_bufs;
			c->free_bufs = &k->bufs[i];
			POISON(k->bufs[i].data, sizeof k->bufs[i].data);
		}
	}
	struct buf *b = c->free_bufs;
	c->free_bufs = b->next;
	UNPOISON(b->data, sizeof b->data);
	return b;
}

static void buf_put(struct jc_core *c, struct buf *b)
{
	if (b) {
		b->next = c->free_bufs;
		c->free_bufs = b;
		POISON(b->data, sizeof b->data);
	}
}

/* Payloads of the last take become free again. */
static void reclaim_lent(struct jc_core *c)
{
	while (c->lent) {
		struct buf *b = c->lent;
		c->lent = b->next;
		buf_put(c, b);
	}
}

/* Grow *arr (elements of `size` bytes, capacity *cap) to hold at least `need`. */
static bool grow(void **arr, size_t *cap, size_t need, size_t size)
{
	if (need <= *cap)
		return true;
	size_t n = *cap ? *cap : 16;
	while (n < need)
		n *= 2;
	void *p = realloc(*arr, n * size);
	if (!p)
		return false;
	*arr = p;
	*cap = n;
	return true;
}

static int64_t slot_get(struct jc_core *c)
{
	if (c->nfree_slots)
		return c->free_slots[--c->nfree_slots];
	if (c->nslots == UINT32_MAX)
		return -1;
	if (c->nslots == c->slots_cap) {
		size_t cap = c->slots_cap, fcap = c->slots_cap;
		if (!grow((void **)&c->slots, &cap, (size_t)c->nslots + 1, sizeof *c->slots))
			return -1;
		/* Every slot is in use or on the free stack: the stack never holds more than cap. */
		if (!grow((void **)&c->free_slots, &fcap, cap, sizeof *c->free_slots))
			return -1;
		c->slots_cap = cap < fcap ? cap : fcap;
	}
	return c->nslots++;
}

static void slot_put(struct jc_core *c, uint32_t slot)
{
	c->free_slots[c->nfree_slots++] = slot;
}

/* ---- heaps ------------------------------------------------------------------------------- */

static inline bool pending_less(const struct pending_key *a, const struct pending_key *b)
{
	if (a->arrival_ns != b->arrival_ns)
		return a->arrival_ns < b->arrival_ns;
	return a->order < b->order;
}

static inline bool held_less(const struct held_key *a, const struct held_key *b)
{
	if (a->deadline_ns != b->deadline_ns)
		return a->deadline_ns < b->deadline_ns;
	if (a->stream_id != b->stream_id)
		return a->stream_id < b->stream_id;
	if (a->seq != b->seq)
		return a->seq < b->seq;
	if (a->rank != b->rank)
		return a->rank < b->rank;
	return a->order < b->order;
}

#define HEAP_FUNCS(name, type, less)                                                              \
	static void name##_up(type *h, size_t i)                                                  \
	{                                                                                         \
		type x = h[i];                                                                    \
		while (i > 0) {                                                                   \
			size_t p = (i - 1) / 2;                                                   \
			if (!less(&x, &h[p]))                                                     \
				break;                                                            \
			h[i] = h[p];                                                              \
			i = p;                                                                    \
		}                                                                                 \
		h[i] = x;                                                                         \
	}                                                                                         \
	static void name##_down(type *h, size_t n, size_t i)                                     \
	{                                                                                         \
		type x = h[i];                                                                    \
		for (;;) {                                                                        \
			size_t l = 2 * i + 1;                                                     \
			if (l >= n)                                                               \
				break;                                                            \
			if (l + 1 < n && less(&h[l + 1], &h[l]))                                  \
				l++;                                                              \
			if (!less(&h[l], &x))                                                     \
				break;                                                            \
			h[i] = h[l];                                                              \
			i = l;                                                                    \
		}                                                                                 \
		h[i] = x;                                                                         \
	}

HEAP_FUNCS(pending, struct pending_key, pending_less)
HEAP_FUNCS(held, struct held_key, held_less)

/* ---- streams and rings ------------------------------------------------------------------- */

static inline uint32_t hash32(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352dU;
	x ^= x >> 15;
	x *= 0x846ca68bU;
	x ^= x >> 16;
	return x;
}

static bool table_rebuild(struct jc_core *c, uint32_t size)
{
	uint32_t *t = calloc(size, sizeof *t);
	if (!t)
		return false;
	for (uint32_t i = 0; i < c->nstreams; i++) {
		uint32_t at = hash32(c->streams[i].id) & (size - 1);
		while (t[at])
			at = (at + 1) & (size - 1);
		t[at] = i + 1;
	}
	free(c->table);
	c->table = t;
	c->table_mask = size - 1;
	return true;
}

/* Index of a known stream, or -1. */
static int64_t stream_find(const struct jc_core *c, uint32_t id)
{
	uint32_t at = hash32(id) & c->table_mask;
	for (;;) {
		uint32_t v = c->table[at];
		if (!v)
			return -1;
		if (c->streams[v - 1].id == id)
			return v - 1;
		at = (at + 1) & c->table_mask;
	}
}

/* Index of a stream (made on first use), or -1 (max_streams reached) / -2 (no memory). */
static int64_t stream_index(struct jc_core *c, uint32_t id)
{
	uint32_t at = hash32(id) & c->table_mask;
	for (;;) {
		uint32_t v = c->table[at];
		if (!v)
			break;
		if (c->streams[v - 1].id == id)
			return v - 1;
		at = (at + 1) & c->table_mask;
	}
	if (c->cfg.max_streams && c->nstreams >= c->cfg.max_streams)
		return -1;
	if (c->nstreams == UINT32_MAX - 1)
		return -1;
	size_t cap = c->streams_cap;
	if (!grow((void **)&c->streams, &cap, (size_t)c->nstreams + 1, sizeof *c->streams))
		return -2;
	c->streams_cap = (uint32_t)cap;
	uint32_t i = c->nstreams++;
	memset(&c->streams[i], 0, sizeof c->streams[i]);
	c->streams[i].id = id;
	if ((uint64_t)c->nstreams * 2 > (uint64_t)c->table_mask + 1) {
		if (!table_rebuild(c, (c->table_mask + 1) * 2)) {
			c->nstreams--;
			return -2;
		}
	} else {
		c->table[at] = i + 1;
	}
	return i;
}

static struct ring *ring_for(struct jc_core *c, struct endpoint *ep, uint32_t si)
{
	if (si >= ep->rings_cap) {
		size_t cap = ep->rings_cap, old = cap;
		if (!grow((void **)&ep->rings, &cap, (size_t)si + 1, sizeof *ep->rings))
			return NULL;
		memset(ep->rings + old, 0, (cap - old) * sizeof *ep->rings);
		ep->rings_cap = (uint32_t)cap;
	}
	if (!ep->rings[si])
		ep->rings[si] = calloc(1, sizeof(struct ring) + (size_t)c->cfg.ring_size * 8);
	return ep->rings[si];
}

enum verdict { ACCEPT, DUPLICATE, STALE, AHEAD };

/* Whether the ring holds exactly (session, seq): a copy that ring_check would call DUPLICATE,
 * found without changing anything (jasper.dedup.DedupRing.seen). NULL: no ring yet. */
static bool ring_seen(const struct ring *r, uint32_t mask, uint32_t session, uint64_t seq)
{
	return r && r->has_session && session == r->session && seq != 0 &&
	       r->slots[seq & mask] == seq;
}

static enum verdict ring_check(struct ring *r, uint32_t mask, uint32_t session, uint64_t seq,
			       uint64_t ahead)
{
	if (!r->has_session || session != r->session) {
		if (r->has_session && session < r->session)
			return STALE;
		if (r->has_session)
			memset(r->slots, 0, ((size_t)mask + 1) * sizeof r->slots[0]);
		r->session = session;
		r->has_session = true;
		r->highest = 0;
		r->ahead_run = 0;
	}
	if (seq == 0)
		return STALE;
	/* Saturating at JC_AHEAD_RESYNC keeps `ahead_run < JC_AHEAD_RESYNC` exact. */
	if (seq > r->highest && seq - r->highest > ahead) {
		if (r->ahead_run < JC_AHEAD_RESYNC)
			r->ahead_run++;
		if (r->ahead_run < JC_AHEAD_RESYNC)
			return AHEAD;
	}
	uint64_t *slot = &r->slots[seq & mask];
	if (*slot == seq)
		return DUPLICATE;
	if (*slot > seq)
		return STALE;
	*slot = seq;
	r->ahead_run = 0;
	if (seq > r->highest)
		r->highest = seq;
	return ACCEPT;
}

/* ---- MAC --------------------------------------------------------------------------------- */

/* 1 when the copy's MAC is the HMAC-SHA256 (truncated) of its header before the MAC, hedge bit
 * cleared, then its payload, under `mac` (a keyed context); compared in constant time. */
/* The MAC of a datagram (jasper.wire.mac_of) into tag[EVP_MAX_MD_SIZE]; false: libcrypto failed. */
static bool mac_compute(EVP_MAC_CTX *mac, const uint8_t *data, size_t len, uint8_t *tag)
{
	uint8_t head[JASPER_MAC_OFFSET];
	size_t n = 0;
	memcpy(head, data, sizeof head);
	head[AT(flags)] &= (uint8_t)~JASPER_FLAG_HEDGE_COPY;
	/* init with no key re-uses the key schedule made by jc_set_stream. */
	return EVP_MAC_init(mac, NULL, 0, NULL) && EVP_MAC_update(mac, head, sizeof head) &&
	       EVP_MAC_update(mac, data + JASPER_HEADER_LEN, len - JASPER_HEADER_LEN) &&
	       EVP_MAC_final(mac, tag, &n, EVP_MAX_MD_SIZE) && n >= JASPER_MAC_LEN;
}

static bool mac_ok(EVP_MAC_CTX *mac, const uint8_t *data, size_t len)
{
	uint8_t tag[EVP_MAX_MD_SIZE];
	return mac_compute(mac, data, len, tag) &&
	       CRYPTO_memcmp(tag, data + JASPER_MAC_OFFSET, JASPER_MAC_LEN) == 0;
}

static void stream_forget_keys(struct stream *s)
{
	for (int i = 0; i < s->nkeys; i++) {
		EVP_MAC_CTX_free(s->mac[i]); /* libcrypto cleanses the key material it held */
		s->mac[i] = NULL;
	}
	OPENSSL_cleanse(s->epochs, sizeof s->epochs);
	s->nkeys = 0;
	s->keyed = false;
}

int jc_set_stream(struct jc_core *c, uint32_t stream_id, const struct jc_stream_key *keys,
		  int nkeys, int has_session, uint32_t session)
{
	if (nkeys > JC_MAX_KEYS || (nkeys > 0 && !keys))
		return JC_EINVAL;
	for (int i = 0; i < nkeys; i++) {
		if (keys[i].epoch == 0)
			return JC_EINVAL;
		for (int j = 0; j < i; j++)
			if (keys[j].epoch == keys[i].epoch)
				return JC_EINVAL;
	}
	EVP_MAC_CTX *mac[JC_MAX_KEYS] = {NULL};
	int rc = 0;
	if (nkeys > 0 && !c->hmac && !(c->hmac = EVP_MAC_fetch(NULL, "HMAC", NULL)))
		return JC_ECRYPTO;
	OSSL_PARAM params[] = {
		OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
		OSSL_PARAM_construct_end(),
	};
	for (int i = 0; i < nkeys; i++) {
		mac[i] = EVP_MAC_CTX_new(c->hmac);
		if (!mac[i] || !EVP_MAC_init(mac[i], keys[i].key, JC_KEY_LEN, params)) {
			rc = JC_ECRYPTO;
			goto fail;
		}
	}
	int64_t si = stream_index(c, stream_id);
	if (si < 0) {
		rc = si == -1 ? JC_EFULL : JC_ENOMEM;
		goto fail;
	}
	struct stream *s = &c->streams[si];
	stream_forget_keys(s);
	s->configured = true;
	s->keyed = nkeys >= 0;
	s->nkeys = (uint8_t)(nkeys > 0 ? nkeys : 0);
	for (int i = 0; i < s->nkeys; i++) {
		s->epochs[i] = keys[i].epoch;
		s->mac[i] = mac[i];
	}
	s->has_session = has_session != 0;
	s->session = has_session ? session : 0;
	return 0;
fail:
	for (int i = 0; i < nkeys; i++)
		EVP_MAC_CTX_free(mac[i]);
	return rc;
}

int jc_may_admit(const struct jc_core *c, const struct jc_header *h)
{
	int64_t si = stream_find(c, h->stream_id);
	if (si < 0 || !c->streams[si].configured)
		return 0;
	const struct stream *s = &c->streams[si];
	if (s->has_session && h->session != s->session)
		return 0;
	if (!s->keyed)
		return 1;
	for (int k = 0; k < s->nkeys; k++)
		if (s->epochs[k] == h->key_epoch)
			return 1;
	return 0;
}

void jc_drop_stream(struct jc_core *c, uint32_t stream_id)
{
	int64_t si = stream_find(c, stream_id);
	if (si < 0)
		return;
	struct stream *s = &c->streams[si];
	stream_forget_keys(s);
	s->configured = false;
	s->has_session = false;
	s->session = 0;
}

/* ---- loss recovery: the NAK schedule (jasper/recovery.py NakTracker is the spec) ---------- */

static inline void store16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static inline void store32(uint8_t *p, uint32_t v)
{
	store16(p, (uint16_t)(v >> 16));
	store16(p + 2, (uint16_t)v);
}

static inline void store64(uint8_t *p, uint64_t v)
{
	store32(p, (uint32_t)(v >> 32));
	store32(p + 4, (uint32_t)v);
}

/* splitmix64's finalizer (jasper.recovery.mix64). */
static inline uint64_t mix64(uint64_t x)
{
	uint64_t z = x + UINT64_C(0x9E3779B97F4A7C15);
	z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
	z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
	return z ^ (z >> 31);
}

/* jasper.recovery.jitter_ns: uniform in [0, nak_jitter_ns] from a hash of the NAK's identity. */
static uint64_t nak_jitter(const struct jc_recovery *r, uint32_t endpoint, uint32_t stream,
			   uint64_t first, uint32_t attempt)
{
	uint64_t span = r->nak_jitter_ns;
	if (!span)
		return 0;
	uint64_t h = mix64(r->seed ^ endpoint);
	h = mix64(h ^ stream);
	h = mix64(h ^ first);
	h = mix64(h ^ attempt);
	return span == UINT64_MAX ? h : h % (span + 1);
}

/* Count `n` missing messages of an endpoint as given up (saturating: a counter, not a sum that
 * may wrap; n reaches 2^64 only for a hole up to a seq near 2^64). */
static void give_up(struct jc_core *c, uint32_t endpoint, u128 n)
{
	uint64_t *u = &c->eps[endpoint].c.unrecoverable;
	*u = n >= (u128)(UINT64_MAX - *u) ? UINT64_MAX : *u + (uint64_t)n;
}

static void nak_next_update(struct jc_core *c)
{
	uint64_t m = UINT64_MAX;
	for (size_t i = 0; i < c->ngaps; i++)
		if (c->gaps[i].due < m)
			m = c->gaps[i].due;
	c->nak_next = m;
}

/* NakTracker._open: a new range of `count` from `first`, first NAK after delay plus jitter. */
static void gap_open(struct jc_core *c, uint32_t endpoint, uint32_t stream, uint32_t session,
		     uint64_t first, u128 count, int64_t now_ns)
{
	if (count > JASPER_MAX_NAK_COUNT || c->ngaps >= c->rcfg.max_gaps) {
		give_up(c, endpoint, count);
		return;
	}
	if (!grow((void **)&c->gaps, &c->gaps_cap, c->ngaps + 1, sizeof *c->gaps)) {
		give_up(c, endpoint, count); /* the table cannot grow: as if it were full */
		c->eps[endpoint].c.nomem++;
		c->status = JC_ENOMEM;
		return;
	}
	uint64_t due = (uint64_t)now_ns + c->rcfg.nak_delay_ns +
		       nak_jitter(&c->rcfg, endpoint, stream, first, 0);
	c->gaps[c->ngaps++] = (struct gap){
		.first = first, .due = due, .endpoint = endpoint, .stream_id = stream,
		.session = session, .count = (uint32_t)count, .attempt = 0, .dead = false,
	};
	if (c->ngaps == 1 || due < c->nak_next)
		c->nak_next = due;
}

/* NakTracker._forget: a new session, the old one's open ranges can no longer be asked for. */
static void gaps_forget(struct jc_core *c, uint32_t endpoint, uint32_t stream)
{
	size_t k = 0;
	for (size_t i = 0; i < c->ngaps; i++) {
		struct gap *g = &c->gaps[i];
		if (g->endpoint == endpoint && g->stream_id == stream)
			give_up(c, endpoint, g->count);
		else
			c->gaps[k++] = *g;
	}
	if (k != c->ngaps) {
		c->ngaps = k;
		nak_next_update(c);
	}
}

/* NakTracker._fill: take [seq, end) out of the endpoint's open ranges of `stream`, keeping
 * the list's order (a split puts the part before the copy, then the part after it, in the
 * range's place); the messages taken. */
static u128 gaps_fill(struct jc_core *c, uint32_t endpoint, uint32_t stream, uint64_t seq,
		      u128 end)
{
	u128 filled = 0;
	size_t total = c->ngaps; /* a split never takes the table past max_gaps */
	size_t i = 0;
	while (i < c->ngaps) {
		struct gap *g = &c->gaps[i];
		u128 g_end = (u128)g->first + g->count;
		if (g->endpoint != endpoint || g->stream_id != stream || end <= g->first ||
		    seq >= g_end) {
			i++;
			continue;
		}
		filled += (end < g_end ? end : g_end) - (seq > g->first ? seq : g->first);
		total--;
		bool left = g->first < seq, right = end < g_end;
		if (right && left) {
			if (total + 1 >= c->rcfg.max_gaps ||
			    !grow((void **)&c->gaps, &c->gaps_cap, c->ngaps + 1, sizeof *c->gaps)) {
				give_up(c, endpoint, g_end - end);
				c->gaps[i].count = (uint32_t)(seq - c->gaps[i].first);
				total++;
				i++;
				continue;
			}
			g = &c->gaps[i]; /* grow may have moved it */
			struct gap r = *g;
			r.first = (uint64_t)end;
			r.count = (uint32_t)(g_end - end);
			g->count = (uint32_t)(seq - g->first);
			memmove(&c->gaps[i + 2], &c->gaps[i + 1],
				(c->ngaps - i - 1) * sizeof *c->gaps);
			c->gaps[i + 1] = r;
			c->ngaps++;
			total += 2;
			i += 2;
		} else if (left) {
			g->count = (uint32_t)(seq - g->first);
			total++;
			i++;
		} else if (right && total < c->rcfg.max_gaps) {
			g->count = (uint32_t)(g_end - end);
			g->first = (uint64_t)end;
			total++;
			i++;
		} else {
			if (right) /* only when max_gaps was lowered below the ranges open */
				give_up(c, endpoint, g_end - end);
			memmove(&c->gaps[i], &c->gaps[i + 1], (c->ngaps - i - 1) * sizeof *c->gaps);
			c->ngaps--;
		}
	}
	if (filled)
		nak_next_update(c);
	return filled;
}

/* NakTracker.data: an accepted data copy of `count` messages from `seq`. */
static void nak_data(struct jc_core *c, uint32_t endpoint, struct ring *r, uint32_t stream,
		     uint32_t session, uint64_t seq, uint32_t count, bool retransmit,
		     int64_t now_ns)
{
	u128 end = (u128)seq + count;
	if (!r->nak_started || r->nak_session != session) {
		if (r->nak_started)
			gaps_forget(c, endpoint, stream);
		r->nak_started = true;
		r->nak_session = session;
		r->nak_expected = end;
		/* A session starts at seq 1: a first copy a little later means its very first
		 * messages were lost here (a node joining mid-stream sees a larger seq, no hole). */
		if (seq > 1 && seq <= JC_HEAD_WINDOW)
			gap_open(c, endpoint, stream, session, 1, seq - 1, now_ns);
		return;
	}
	u128 expected = r->nak_expected;
	if (seq >= expected) {
		if (seq > expected)
			gap_open(c, endpoint, stream, session, (uint64_t)expected, seq - expected,
				 now_ns);
		r->nak_expected = end;
		return;
	}
	if (end > expected)
		r->nak_expected = end;
	u128 filled = c->ngaps ? gaps_fill(c, endpoint, stream, seq, end) : 0;
	if (retransmit) {
		/* Its messages before `expected` that were in no open range had been given up: they
		 * came after all (counted recovered), so they leave unrecoverable. */
		u128 back = (end < expected ? end : expected) - seq - filled;
		uint64_t *u = &c->eps[endpoint].c.unrecoverable;
		*u = back >= *u ? 0 : *u - (uint64_t)back;
	}
}

/* NakTracker.heartbeat: the publisher's newest seq; anything up to it not seen yet is missing. */
static void nak_heartbeat(struct jc_core *c, uint32_t endpoint, struct ring *r, uint32_t stream,
			  uint32_t session, uint64_t seq, int64_t now_ns)
{
	if (!r || !r->nak_started || r->nak_session != session || seq < r->nak_expected)
		return;
	gap_open(c, endpoint, stream, session, (uint64_t)r->nak_expected,
		 (u128)seq + 1 - r->nak_expected, now_ns);
	r->nak_expected = (u128)seq + 1;
}

/* One NAK datagram (jasper.wire.encode_nak) into the queue, signed with the stream's newest
 * key epoch when it is keyed (ReceiverCore._poll_naks). */
static bool nak_emit(struct jc_core *c, uint32_t endpoint, uint32_t stream, uint32_t session,
		     const struct nak_range *ranges, size_t n, int64_t now_ns)
{
	if (c->nak_head + c->nak_len == c->nak_cap && c->nak_head) {
		memmove(c->naks, c->naks + c->nak_head, c->nak_len * sizeof *c->naks);
		c->nak_head = 0;
	}
	if (!grow((void **)&c->naks, &c->nak_cap, c->nak_head + c->nak_len + 1, sizeof *c->naks)) {
		c->eps[endpoint].c.nomem++;
		c->status = JC_ENOMEM;
		return false;
	}
	struct jc_nak *k = &c->naks[c->nak_head + c->nak_len++];
	size_t len = JASPER_HEADER_LEN + n * JASPER_NAK_RANGE_LEN;
	uint8_t *d = k->data;
	memset(d, 0, JASPER_HEADER_LEN);
	store16(d + AT(magic), JASPER_MAGIC);
	d[AT(version)] = JASPER_VERSION;
	d[AT(flags)] = JASPER_FLAG_NAK;
	store32(d + AT(stream_id), stream);
	store32(d + AT(session), session);
	store64(d + AT(seq), ranges[0].first);
	store64(d + AT(send_time_ns), (uint64_t)now_ns);
	store16(d + AT(payload_len), (uint16_t)(n * JASPER_NAK_RANGE_LEN));
	store16(d + AT(msg_count), (uint16_t)n);
	for (size_t i = 0; i < n; i++) {
		uint8_t *at = d + JASPER_HEADER_LEN + i * JASPER_NAK_RANGE_LEN;
		store64(at, ranges[i].first);
		store32(at + 8, ranges[i].count);
		store16(at + 12, ranges[i].attempt);
		store16(at + 14, 0);
	}
	int64_t si = stream_find(c, stream);
	const struct stream *st = si < 0 ? NULL : &c->streams[si];
	if (st && st->configured && st->keyed && st->nkeys > 0) {
		int newest = 0;
		for (int i = 1; i < st->nkeys; i++)
			if (st->epochs[i] > st->epochs[newest])
				newest = i;
		uint8_t tag[EVP_MAX_MD_SIZE];
		store32(d + AT(key_epoch), st->epochs[newest]);
		/* libcrypto failing leaves the MAC zero: the publisher refuses it ("mac"). */
		if (mac_compute(st->mac[newest], d, len, tag))
			memcpy(d + JASPER_MAC_OFFSET, tag, JASPER_MAC_LEN);
	}
	k->endpoint = endpoint;
	k->stream_id = stream;
	k->session = session;
	k->len = (uint16_t)len;
	return true;
}

static int gap_ref_cmp(const void *pa, const void *pb)
{
	const struct gap_ref *a = pa, *b = pb;
	if (a->endpoint != b->endpoint)
		return a->endpoint < b->endpoint ? -1 : 1;
	if (a->stream_id != b->stream_id)
		return a->stream_id < b->stream_id ? -1 : 1;
	if (a->session != b->session)
		return a->session < b->session ? -1 : 1;
	if (a->first != b->first)
		return a->first < b->first ? -1 : 1;
	return a->idx < b->idx ? -1 : a->idx > b->idx;
}

/*
 * NakTracker.poll: the NAKs due at now_ns. Every (endpoint, stream, session) with a range due
 * sends one NAK (per MAX_NAK_RANGES) with every range of its own due within the next jitter
 * span, in sequence order; ranges whose attempts are spent are given up instead.
 */
static void poll_naks(struct jc_core *c, int64_t now_ns)
{
	if (!c->recovery_on || !c->ngaps || c->nak_next > (uint64_t)now_ns)
		return;
	size_t n = c->ngaps;
	if (n > c->scratch_cap) {
		size_t cap = c->scratch_cap, cap2 = c->scratch_cap;
		if (!grow((void **)&c->refs, &cap, n, sizeof *c->refs) ||
		    !grow((void **)&c->ranges, &cap2, n, sizeof *c->ranges)) {
			c->status = JC_ENOMEM; /* nothing changed: the next call tries again */
			return;
		}
		c->scratch_cap = cap < cap2 ? cap : cap2;
	}
	for (size_t i = 0; i < n; i++) {
		const struct gap *g = &c->gaps[i];
		c->refs[i] = (struct gap_ref){g->endpoint, g->stream_id, g->session, (uint32_t)i,
					      g->first};
	}
	qsort(c->refs, n, sizeof *c->refs, gap_ref_cmp);
	const struct jc_recovery *cfg = &c->rcfg;
	uint64_t now = (uint64_t)now_ns, horizon = now + cfg->nak_jitter_ns;
	bool dead = false;
	for (size_t a = 0, b; a < n; a = b) {
		const struct gap_ref *key = &c->refs[a];
		bool key_due = false;
		for (b = a; b < n && c->refs[b].endpoint == key->endpoint &&
			    c->refs[b].stream_id == key->stream_id &&
			    c->refs[b].session == key->session;
		     b++)
			key_due |= c->gaps[c->refs[b].idx].due <= now;
		if (!key_due)
			continue;
		struct endpoint *ep = &c->eps[key->endpoint];
		size_t nr = 0;
		for (size_t k = a; k < b; k++) {
			struct gap *g = &c->gaps[c->refs[k].idx];
			if (g->due > horizon)
				continue;
			if (g->attempt >= cfg->attempts) {
				g->dead = dead = true;
				give_up(c, g->endpoint, g->count);
				continue;
			}
			g->attempt++;
			g->due = now + cfg->retry_ns +
				 nak_jitter(cfg, g->endpoint, g->stream_id, g->first, g->attempt);
			c->ranges[nr++] = (struct nak_range){g->first, g->count, g->attempt};
		}
		for (size_t at = 0; at < nr; at += JASPER_MAX_NAK_RANGES) {
			size_t m = nr - at < JASPER_MAX_NAK_RANGES ? nr - at : JASPER_MAX_NAK_RANGES;
			if (nak_emit(c, key->endpoint, key->stream_id, key->session, c->ranges + at,
				     m, now_ns)) {
				ep->c.naks_sent++;
				ep->c.naks_coalesced += m - 1;
			}
		}
	}
	if (dead) {
		size_t k = 0;
		for (size_t i = 0; i < c->ngaps; i++)
			if (!c->gaps[i].dead)
				c->gaps[k++] = c->gaps[i];
		c->ngaps = k;
	}
	nak_next_update(c);
}

static void recovery_forget(struct jc_core *c)
{
	c->ngaps = 0;
	for (uint32_t e = 0; e < c->endpoints; e++)
		for (uint32_t s = 0; s < c->eps[e].rings_cap; s++)
			if (c->eps[e].rings[s])
				c->eps[e].rings[s]->nak_started = false;
}

int jc_set_recovery(struct jc_core *c, const struct jc_recovery *cfg)
{
	if (!cfg) {
		c->recovery_on = false;
		recovery_forget(c);
		return 0;
	}
	if (cfg->attempts < 1 || cfg->attempts > 0xFFFF || cfg->max_gaps < 1 ||
	    cfg->max_gaps > (UINT32_C(1) << 20) || cfg->nak_jitter_ns > JC_RECOVERY_MAX_WAIT ||
	    cfg->nak_delay_ns > JC_RECOVERY_MAX_WAIT - cfg->nak_jitter_ns ||
	    cfg->retry_ns > JC_RECOVERY_MAX_WAIT - cfg->nak_jitter_ns)
		return JC_EINVAL;
	c->rcfg = *cfg;
	c->recovery_on = true;
	return 0;
}

size_t jc_naks_waiting(const struct jc_core *c)
{
	return c->nak_len;
}

size_t jc_take_naks(struct jc_core *c, struct jc_nak *out, size_t max)
{
	size_t n = c->nak_len < max ? c->nak_len : max;
	if (n)
		memcpy(out, c->naks + c->nak_head, n * sizeof *out);
	c->nak_head += n;
	c->nak_len -= n;
	if (!c->nak_len)
		c->nak_head = 0;
	return n;
}

int64_t jc_next_nak(const struct jc_core *c)
{
	if (!c->recovery_on || !c->ngaps || c->nak_next > (uint64_t)INT64_MAX)
		return INT64_MAX;
	return (int64_t)c->nak_next;
}

size_t jc_open_gaps(const struct jc_core *c)
{
	return c->ngaps;
}

static struct jc_parent *parent_for(struct endpoint *ep, uint32_t id)
{
	if (id != JC_PARENT_OTHER) {
		for (uint32_t i = 0; i < ep->nparents; i++)
			if (ep->parents[i].id == id)
				return &ep->parents[i];
		if (ep->nparents < JC_MAX_PARENTS) {
			struct jc_parent *p = &ep->parents[ep->nparents++];
			p->id = id;
			p->copies = p->kept = 0;
			return p;
		}
	}
	if (!ep->other_seen) {
		ep->other_seen = true;
		ep->other.id = JC_PARENT_OTHER;
		ep->other.copies = ep->other.kept = 0;
	}
	return &ep->other;
}

/* ---- the core ---------------------------------------------------------------------------- */

int jc_config_check(const struct jc_config *cfg)
{
	if (!cfg || cfg->endpoints < 1 || cfg->hold_capacity < 1)
		return JC_EINVAL;
	if (cfg->ring_size < 2 || (cfg->ring_size & (cfg->ring_size - 1)))
		return JC_EINVAL;
	if (cfg->ahead_window < 1)
		return JC_EINVAL;
	return 0;
}

static bool endpoints_grow(struct jc_core *c, uint32_t n)
{
	struct endpoint *eps = realloc(c->eps, (size_t)n * sizeof *eps);
	if (!eps)
		return false;
	memset(eps + c->endpoints, 0, (size_t)(n - c->endpoints) * sizeof *eps);
	c->eps = eps;
	c->endpoints = n;
	return true;
}

struct jc_core *jc_new(const struct jc_config *cfg)
{
	if (jc_config_check(cfg))
		return NULL;
	struct jc_core *c = calloc(1, sizeof *c);
	if (!c)
		return NULL;
	c->cfg = *cfg;
	if (!endpoints_grow(c, cfg->endpoints) || !table_rebuild(c, 16)) {
		jc_free(c);
		return NULL;
	}
	return c;
}

void jc_free(struct jc_core *c)
{
	if (!c)
		return;
	for (uint32_t e = 0; e < c->endpoints; e++) {
		for (uint32_t s = 0; s < c->eps[e].rings_cap; s++)
			free(c->eps[e].rings[s]);
		free(c->eps[e].rings);
	}
	free(c->eps);
	for (uint32_t i = 0; i < c->nstreams; i++)
		stream_forget_keys(&c->streams[i]);
	EVP_MAC_free(c->hmac);
	free(c->streams);
	free(c->table);
	free(c->slots);
	free(c->free_slots);
	free(c->pending);
	free(c->held);
	free(c->rel);
	free(c->gaps);
	free(c->refs);
	free(c->ranges);
	free(c->naks);
	while (c->chunks) {
		struct buf_chunk *k = c->chunks;
		c->chunks = k->next;
		UNPOISON(k, sizeof *k);
		free(k);
	}
	free(c);
}

int jc_set_endpoints(struct jc_core *c, uint32_t n)
{
	reclaim_lent(c);
	if (n < c->endpoints)
		return JC_EINVAL;
	if (n == c->endpoints)
		return 0;
	return endpoints_grow(c, n) ? 0 : JC_ENOMEM;
}

uint32_t jc_endpoints(const struct jc_core *c)
{
	return c->endpoints;
}

/* Queue one release; the buffer (if any) moves with it. */
static void emit(struct jc_core *c, const struct copy *cp, struct buf *b, uint8_t kind,
		 uint64_t deadline_ns, int64_t now_ns)
{
	if (c->rel_head + c->rel_len == c->rel_cap && c->rel_head) {
		memmove(c->rel, c->rel + c->rel_head, c->rel_len * sizeof *c->rel);
		c->rel_head = 0;
	}
	if (!grow((void **)&c->rel, &c->rel_cap, c->rel_head + c->rel_len + 1, sizeof *c->rel)) {
		c->eps[cp->endpoint].c.nomem++;
		c->status = JC_ENOMEM;
		buf_put(c, b);
		return;
	}
	struct release_entry *e = &c->rel[c->rel_head + c->rel_len++];
	e->buf = b;
	e->r.endpoint = cp->endpoint;
	e->r.parent = cp->parent;
	e->r.stream_id = cp->h.stream_id;
	e->r.session = cp->h.session;
	e->r.seq = cp->h.seq;
	e->r.count = cp->h.msg_count;
	e->r.kind = kind;
	e->r.deadline_ns = deadline_ns;
	e->r.send_ns = cp->h.send_time_ns;
	e->r.arrival_ns = cp->arrival_ns;
	e->r.release_ns = now_ns;
	e->r.payload = b->data + JASPER_HEADER_LEN;
	e->r.payload_len = (size_t)cp->len - JASPER_HEADER_LEN;
	struct endpoint *ep = &c->eps[cp->endpoint];
	ep->c.released += cp->h.msg_count;
	e->r.mp_flags = kind == JC_LATE ? JASPER_MP_FLAG_LATE : 0;
	if (cp->h.flags & JASPER_FLAG_RETRANSMIT)
		e->r.mp_flags |= JASPER_MP_FLAG_RECOVERED;
	/* The copy was accepted, so its ring exists (rings outlive a dropped stream). */
	int64_t si = stream_find(c, cp->h.stream_id);
	struct ring *r = si >= 0 && (uint32_t)si < ep->rings_cap ? ep->rings[si] : NULL;
	if (!r)
		return;
	uint64_t seq = cp->h.seq, end = seq + cp->h.msg_count;
	if (!r->gap_started || r->gap_session != cp->h.session) {
		r->gap_started = true;
		r->gap_session = cp->h.session;
		r->gap_next = end;
		return;
	}
	if (seq > r->gap_next) {
		e->r.mp_flags |= JASPER_MP_FLAG_GAP_BEFORE;
		ep->c.gaps++;
		ep->c.gap_messages += seq - r->gap_next;
	}
	if (end > r->gap_next)
		r->gap_next = end;
}

size_t jc_frame(const struct jc_release *r, uint8_t *out, size_t cap)
{
	size_t at = 0, o = 0;
	struct jasper_mp_hdr h = {
		.magic = NET16(JASPER_MP_MAGIC),
		.version = JASPER_MP_VERSION,
		.flags = r->mp_flags,
		.stream_id = NET32(r->stream_id),
		.release_ns = NET64((uint64_t)r->release_ns),
		.deadline_ns = NET64(r->deadline_ns),
		.session = NET32(r->session),
	};
	for (uint32_t i = 0; i < r->count; i++) {
		if (at + JASPER_BLOCK_HEADER_LEN > r->payload_len)
			return 0; /* cannot happen for a parsed datagram */
		size_t len = ((size_t)r->payload[at] << 8) | r->payload[at + 1];
		at += JASPER_BLOCK_HEADER_LEN;
		if (at + len > r->payload_len || o + JASPER_MP_HEADER_LEN + len > cap)
			return 0;
		h.seq = NET64(r->seq + i);
		h.length = NET16((uint16_t)len);
		memcpy(out + o, &h, sizeof h);
		memcpy(out + o + JASPER_MP_HEADER_LEN, r->payload + at, len);
		o += JASPER_MP_HEADER_LEN + len;
		at += len;
		h.flags = r->mp_flags & ~JASPER_MP_FLAG_GAP_BEFORE;
	}
	return o;
}

static inline bool due(uint64_t deadline_ns, int64_t now_ns)
{
	return deadline_ns <= (uint64_t)now_ns; /* now_ns >= 0 throughout */
}

/*
 * Process one copy at now_ns (jasper/receiver_core.py ReceiverCore._process). The copy's
 * bytes are in `b` when it waited, else in `data` (the caller's, copied only if kept). `slot`
 * is the copy's slot when it came from the pending set (reused for the hold), else -1.
 */
static void process(struct jc_core *c, struct copy *cp, const uint8_t *data, struct buf *b,
		    int64_t slot, int64_t now_ns)
{
	struct endpoint *ep = &c->eps[cp->endpoint];
	if (cp->reason) {
		ep->c.malformed[cp->reason - 1]++;
		goto drop;
	}
	/* Authenticate before anything about the copy is believed or remembered. */
	int64_t si = stream_find(c, cp->h.stream_id);
	const struct stream *st = si < 0 ? NULL : &c->streams[si];
	if (!st || !st->configured) {
		ep->c.rejected[JC_REJECT_STREAM]++;
		goto drop;
	}
	if (st->keyed) {
		int k = 0;
		while (k < st->nkeys && st->epochs[k] != cp->h.key_epoch)
			k++;
		if (k == st->nkeys) {
			ep->c.rejected[JC_REJECT_KEY]++;
			goto drop;
		}
		/* A duplicate of a copy already kept is dropped whatever its MAC says: it moves no
		 * state and releases nothing, so it need not be hashed (at H=2 two copies in three). */
		const struct ring *seen = (uint32_t)si < ep->rings_cap ? ep->rings[si] : NULL;
		if (!(cp->h.flags & JASPER_FLAG_HEARTBEAT) &&
		    (!st->has_session || cp->h.session == st->session) &&
		    ring_seen(seen, c->cfg.ring_size - 1, cp->h.session, cp->h.seq)) {
			parent_for(ep, cp->parent)->copies++;
			ep->c.duplicates++;
			goto drop;
		}
		if (!mac_ok(st->mac[k], b ? b->data : data, cp->len)) {
			ep->c.rejected[JC_REJECT_MAC]++;
			goto drop;
		}
	}
	if (st->has_session && cp->h.session != st->session) {
		ep->c.rejected[JC_REJECT_SESSION]++;
		goto drop;
	}
	struct jc_parent *par = parent_for(ep, cp->parent);
	par->copies++;
	if (cp->h.flags & JASPER_FLAG_HEARTBEAT) {
		ep->c.heartbeats++;
		if (c->recovery_on)
			nak_heartbeat(c, cp->endpoint,
				      (uint32_t)si < ep->rings_cap ? ep->rings[si] : NULL,
				      cp->h.stream_id, cp->h.session, cp->h.seq, now_ns);
		goto drop;
	}
	struct ring *r = ring_for(c, ep, (uint32_t)si);
	if (!r) {
		ep->c.nomem++;
		c->status = JC_ENOMEM;
		goto drop;
	}
	enum verdict v = ring_check(r, c->cfg.ring_size - 1, cp->h.session, cp->h.seq,
				    c->cfg.ahead_window);
	if (v != ACCEPT) {
		if (v == DUPLICATE)
			ep->c.duplicates++;
		else if (v == AHEAD)
			ep->c.rejected[JC_REJECT_AHEAD]++;
		else
			ep->c.stale++;
		goto drop;
	}
	ep->c.accepted++;
	par->kept++;
	if (c->recovery_on)
		nak_data(c, cp->endpoint, r, cp->h.stream_id, cp->h.session, cp->h.seq,
			 cp->h.msg_count, (cp->h.flags & JASPER_FLAG_RETRANSMIT) != 0, now_ns);
	if (!b) {
		b = buf_get(c);
		if (!b) {
			ep->c.nomem++;
			c->status = JC_ENOMEM;
			goto drop;
		}
		memcpy(b->data, data, cp->len);
	}
	uint64_t deadline = cp->h.deadline_ns;
	uint8_t kind;
	if (deadline == 0) {
		kind = JC_UNSTAMPED;
	} else if (due(deadline, now_ns)) {
		kind = JC_LATE;
		ep->c.late += cp->h.msg_count;
	} else if (c->nheld >= c->cfg.hold_capacity) {
		kind = JC_OVERFLOW;
		ep->c.hold_overflow++;
	} else {
		if (slot < 0)
			slot = slot_get(c);
		if (slot < 0 || !grow((void **)&c->held, &c->held_cap, c->nheld + 1,
				      sizeof *c->held)) {
			ep->c.nomem++;
			c->status = JC_ENOMEM;
			goto drop;
		}
		struct stream *s = &c->streams[si];
		if (cp->h.flags & JASPER_FLAG_RETRANSMIT) {
			/* A retransmission filling a hole keeps its own deadline and leaves the floor:
			 * it is below the floor only because later messages were held before it came,
			 * and it still sorts before them (ReleaseSchedule.order, clamp=False). */
			ep->c.recovered += cp->h.msg_count;
		} else if (deadline < s->floor) {
			deadline = s->floor;
			c->clamped++;
		} else {
			s->floor = deadline;
		}
		uint32_t n = c->endpoints;
		uint32_t rank = (uint32_t)(((uint64_t)cp->endpoint + n - cp->h.seq % n) % n);
		struct copy *held = &c->slots[slot];
		if (held != cp)
			*held = *cp;
		held->buf = b;
		held->deadline_ns = deadline;
		c->held[c->nheld] = (struct held_key){
			.deadline_ns = deadline,
			.seq = cp->h.seq,
			.order = c->tiebreak++,
			.stream_id = cp->h.stream_id,
			.rank = rank,
			.slot = (uint32_t)slot,
		};
		held_up(c->held, c->nheld++);
		return;
	}
	if (slot >= 0)
		slot_put(c, (uint32_t)slot);
	if (cp->h.flags & JASPER_FLAG_RETRANSMIT) {
		if (kind == JC_LATE)
			ep->c.recovered_late += cp->h.msg_count;
		else
			ep->c.recovered += cp->h.msg_count;
	}
	emit(c, cp, b, kind, deadline, now_ns);
	return;
drop:
	if (slot >= 0)
		slot_put(c, (uint32_t)slot);
	buf_put(c, b);
}

static void pending_pop_process(struct jc_core *c, int64_t now_ns)
{
	uint32_t slot = c->pending[0].slot;
	c->pending[0] = c->pending[--c->npending];
	if (c->npending)
		pending_down(c->pending, c->npending, 0);
	struct copy *cp = &c->slots[slot];
	process(c, cp, NULL, cp->buf, slot, now_ns);
}

static void held_pop_release(struct jc_core *c, int64_t now_ns)
{
	uint32_t slot = c->held[0].slot;
	c->held[0] = c->held[--c->nheld];
	if (c->nheld)
		held_down(c->held, c->nheld, 0);
	struct copy *cp = &c->slots[slot];
	struct copy copy = *cp;
	slot_put(c, slot);
	emit(c, &copy, copy.buf, JC_ON_TIME, copy.deadline_ns, now_ns);
}

static void release_due(struct jc_core *c, int64_t now_ns)
{
	while (c->nheld && due(c->held[0].deadline_ns, now_ns))
		held_pop_release(c, now_ns);
}

static void advance(struct jc_core *c, int64_t now_ns)
{
	while (c->npending && c->pending[0].arrival_ns <= now_ns)
		pending_pop_process(c, now_ns);
	release_due(c, now_ns);
	poll_naks(c, now_ns);
}

static int finish(struct jc_core *c)
{
	int st = c->status;
	c->status = 0;
	return st;
}

int jc_advance(struct jc_core *c, int64_t now_ns)
{
	reclaim_lent(c);
	if (now_ns < 0)
		return JC_EINVAL;
	advance(c, now_ns);
	return finish(c);
}

int jc_flush(struct jc_core *c, int64_t now_ns)
{
	reclaim_lent(c);
	if (now_ns < 0)
		return JC_EINVAL;
	while (c->npending)
		pending_pop_process(c, now_ns);
	while (c->nheld)
		held_pop_release(c, now_ns);
	return finish(c);
}

/* Put a copy in the pending set (the caller checked the capacity). */
static void pending_push(struct jc_core *c, const struct copy *in, const uint8_t *data)
{
	struct buf *b = NULL;
	/* Heartbeats too: their MAC is checked when they are processed. */
	if (!in->reason) {
		b = buf_get(c);
		if (!b)
			goto nomem;
		memcpy(b->data, data, in->len);
	}
	int64_t slot = slot_get(c);
	if (slot < 0 || !grow((void **)&c->pending, &c->pending_cap, c->npending + 1,
			      sizeof *c->pending)) {
		if (slot >= 0)
			slot_put(c, (uint32_t)slot);
		buf_put(c, b);
		goto nomem;
	}
	c->slots[slot] = *in;
	c->slots[slot].buf = b;
	c->pending[c->npending] = (struct pending_key){
		.arrival_ns = in->arrival_ns,
		.order = c->receipts++,
		.slot = (uint32_t)slot,
	};
	pending_up(c->pending, c->npending++);
	return;
nomem:
	c->eps[in->endpoint].c.nomem++;
	c->status = JC_ENOMEM;
}

int jc_datagram(struct jc_core *c, uint32_t endpoint, const uint8_t *data, size_t len,
		uint32_t parent, int64_t arrival_ns, int64_t now_ns)
{
	reclaim_lent(c);
	if (endpoint >= c->endpoints || arrival_ns < 0 || now_ns < 0 || (!data && len))
		return JC_EINVAL;
	struct endpoint *ep = &c->eps[endpoint];
	ep->c.received++;
	if (len > MAX_DATAGRAM) {
		/* Refused before it is stored, so the pending set stays bounded. */
		ep->c.malformed[JC_MALFORMED_LENGTH - 1]++;
		advance(c, now_ns);
		return finish(c);
	}
	struct copy cp = {0};
	cp.reason = (uint8_t)jc_parse(data, len, &cp.h);
	cp.arrival_ns = arrival_ns;
	cp.deadline_ns = 0;
	cp.endpoint = endpoint;
	cp.parent = parent;
	cp.len = (uint16_t)len;
	cp.buf = NULL;
	if (arrival_ns > now_ns) {
		/* Copies due by now no longer wait and do not count against the capacity. */
		advance(c, now_ns);
		if (c->npending >= c->cfg.pending_capacity)
			ep->c.pending_overflow++;
		else
			pending_push(c, &cp, data);
		return finish(c);
	}
	if (c->npending && c->pending[0].arrival_ns <= now_ns) {
		pending_push(c, &cp, data);
		advance(c, now_ns);
		return finish(c);
	}
	/* Nothing else is due: process it straight from the caller's bytes. */
	process(c, &cp, data, NULL, -1, now_ns);
	release_due(c, now_ns);
	poll_naks(c, now_ns);
	return finish(c);
}

static int copy_timer(const struct jc_core *c, uint64_t *when)
{
	bool any = false;
	uint64_t t = 0;
	if (c->nheld) {
		t = c->held[0].deadline_ns;
		any = true;
	}
	if (c->npending && (!any || (uint64_t)c->pending[0].arrival_ns < t)) {
		t = (uint64_t)c->pending[0].arrival_ns;
		any = true;
	}
	*when = t;
	return any;
}

int jc_get_timer(const struct jc_core *c, uint64_t *when)
{
	uint64_t t;
	bool any = copy_timer(c, &t);
	if (c->recovery_on && c->ngaps && (!any || c->nak_next < t)) {
		t = c->nak_next;
		any = true;
	}
	if (any && when)
		*when = t;
	return any;
}

int64_t jc_next_copy_timer(const struct jc_core *c)
{
	uint64_t t;
	if (!copy_timer(c, &t) || t > (uint64_t)INT64_MAX)
		return INT64_MAX;
	return (int64_t)t;
}

int64_t jc_next_timer(const struct jc_core *c)
{
	uint64_t t;
	if (!jc_get_timer(c, &t) || t > (uint64_t)INT64_MAX)
		return INT64_MAX;
	return (int64_t)t;
}

size_t jc_releases_waiting(const struct jc_core *c)
{
	return c->rel_len;
}

size_t jc_take_releases(struct jc_core *c, struct jc_release *out, size_t max)
{
	reclaim_lent(c);
	size_t n = c->rel_len < max ? c->rel_len : max;
	for (size_t i = 0; i < n; i++) {
		struct release_entry *e = &c->rel[c->rel_head + i];
		out[i] = e->r;
		e->buf->next = c->lent;
		c->lent = e->buf;
	}
	c->rel_head += n;
	c->rel_len -= n;
	if (!c->rel_len)
		c->rel_head = 0;
	return n;
}

int jc_counters(const struct jc_core *c, uint32_t endpoint, struct jc_counters *out)
{
	if (endpoint >= c->endpoints)
		return JC_EINVAL;
	*out = c->eps[endpoint].c;
	return 0;
}

int jc_parents(const struct jc_core *c, uint32_t endpoint, struct jc_parent *out, size_t max)
{
	if (endpoint >= c->endpoints)
		return JC_EINVAL;
	const struct endpoint *ep = &c->eps[endpoint];
	size_t n = 0;
	for (uint32_t i = 0; i < ep->nparents && n < max; i++)
		out[n++] = ep->parents[i];
	if (ep->other_seen && n < max)
		out[n++] = ep->other;
	return (int)n;
}

size_t jc_held(const struct jc_core *c)
{
	return c->nheld;
}

size_t jc_pending(const struct jc_core *c)
{
	return c->npending;
}

uint64_t jc_clamped(const struct jc_core *c)
{
	return c->clamped;
}
