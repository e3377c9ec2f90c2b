/* receiver_core.h: the receiver core's C API (docs/receiver-core.md), no I/O, no clock. */
/*
 * One core per receiver process: copies come in with their endpoint, parent id, effective
 * arrival and the node clock; releases go out, pulled. Time comes in as an argument: every
 * input call first advances the core to `now_ns` (calls come with non-decreasing now_ns).
 * Times (now_ns, arrival_ns, release_ns) are int64 ns >= 0; the header's send and deadline
 * times are raw u64 from the wire.
 *
 * Not thread-safe: one thread drives a core. Nothing here blocks or reads a clock.
 *
 * Memory: every store is bounded by the config except the queue of releases not yet taken
 * (take them after every input call) and the stream tables (one entry per stream id ever given
 * to jc_set_stream, bounded by max_streams when set; copies never create one).
 * Datagram buffers (MAX_DATAGRAM bytes each) come from a free list that grows lazily up to
 * about pending_capacity + hold_capacity + untaken releases; nothing is allocated per copy
 * once the pools are warm, except inside libcrypto: re-initialising a keyed HMAC context for a
 * copy of a keyed stream makes two small mallocs (and frees) in OpenSSL 3.0 (measured; the
 * legacy HMAC_CTX reuse does the same). The parser never allocates.
 */
#ifndef JASPER_RECEIVER_CORE_H
#define JASPER_RECEIVER_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "jasper_wire.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- parsing ----------------------------------------------------------------------------- */

/* jc_parse results: 0, or 1 + the index of the reason in jasper.wire_spec.MALFORMED_REASONS. */
enum jc_parse_result {
	JC_PARSE_OK = 0,
	JC_MALFORMED_SHORT = 1, /* fewer bytes than the header */
	JC_MALFORMED_MAGIC = 2,
	JC_MALFORMED_VERSION = 3,
	JC_MALFORMED_FLAGS = 4, /* unknown flag bits */
	JC_MALFORMED_LENGTH = 5, /* payload_len != bytes after the header, or > MAX_PAYLOAD */
	JC_MALFORMED_COUNT = 6, /* msg_count disagrees with the blocks */
	JC_MALFORMED_OVERRUN = 7, /* a block runs past the end */
};
#define JC_MALFORMED_REASONS 7

/* "short", "magic", ... in MALFORMED_REASONS order: jc_malformed_reason[result - 1]. */
extern const char *const jc_malformed_reason[JC_MALFORMED_REASONS];

/* Why a well-formed copy was refused: indices into jasper.wire_spec.REJECT_REASONS. */
enum jc_reject {
	JC_REJECT_STREAM = 0, /* a stream never set (or dropped) */
	JC_REJECT_KEY = 1, /* a keyed stream holds no key of the copy's key_epoch */
	JC_REJECT_MAC = 2, /* the MAC does not match */
	JC_REJECT_SESSION = 3, /* not the announced session */
	JC_REJECT_AHEAD = 4, /* seq beyond the window ahead of the newest accepted */
};
#define JC_REJECT_REASONS 5
extern const char *const jc_reject_reason[JC_REJECT_REASONS];

/* The fixed header in host byte order. */
struct jc_header {
	uint8_t version;
	uint8_t flags;
	uint16_t payload_len;
	uint16_t msg_count;
	uint32_t stream_id;
	uint32_t session;
	uint32_t plan_epoch;
	uint64_t seq;
	uint64_t send_time_ns;
	uint64_t deadline_ns;
	uint32_t key_epoch;
};

/*
 * Check one datagram exactly like overlay.fastwire.peek (same checks, same order) and fill
 * *out (valid when the result is JC_PARSE_OK). Reads only data[0..len); never allocates.
 */
int jc_parse(const uint8_t *data, size_t len, struct jc_header *out);

/* ---- the core ---------------------------------------------------------------------------- */

/* Return codes of the calls below (0 = done). */
#define JC_EINVAL (-1) /* the caller's bug: endpoint out of range, negative time, bad config */
#define JC_ENOMEM (-2) /* an allocation failed; the copy concerned was dropped, counted nomem,
			 * and the call still did the rest of its work */
#define JC_EFULL (-3) /* jc_set_stream: max_streams stream ids are known already */
#define JC_ECRYPTO (-4) /* jc_set_stream: libcrypto could not key an HMAC-SHA256 */

struct jc_config {
	uint32_t endpoints; /* MP endpoints, >= 1 */
	uint32_t ring_size; /* dedup ring slots per (endpoint, stream): a power of two >= 2 */
	uint32_t hold_capacity; /* held entries at most */
	uint32_t pending_capacity; /* copies waiting for a future arrival at most */
	uint32_t max_streams; /* stream ids jc_set_stream takes at most, 0 = unbounded */
	uint64_t ahead_window; /* >= 1: a seq further than this beyond the newest accepted one of
				  its (endpoint, stream, session) is refused ("ahead") and moves no
				  state, until JC_AHEAD_RESYNC such copies in a row */
};
#define JC_AHEAD_WINDOW (UINT64_C(1) << 20) /* jasper.dedup.AHEAD_WINDOW */
#define JC_AHEAD_RESYNC 64 /* jasper.dedup.AHEAD_RESYNC */
#define JC_CONFIG_DEFAULT {1, 4096, 65536, 65536, 0, JC_AHEAD_WINDOW}

enum jc_release_kind {
	JC_ON_TIME = 0,
	JC_LATE = 1,
	JC_UNSTAMPED = 2,
	JC_OVERFLOW = 3,
};

/* One release: a datagram's messages handed to its endpoint. */
struct jc_release {
	uint32_t endpoint;
	uint32_t parent; /* parent id of the copy kept */
	uint32_t stream_id;
	uint32_t session;
	uint64_t seq; /* first message's sequence number */
	uint16_t count; /* messages (msg_count) */
	uint8_t kind; /* enum jc_release_kind */
	uint64_t deadline_ns; /* deadline in force (clamped); 0 when unstamped */
	uint64_t send_ns; /* header's root send time */
	int64_t arrival_ns; /* the copy's effective arrival */
	int64_t release_ns; /* now_ns of the call that released it */
	const uint8_t *payload; /* the message blocks (bytes after the header); see jc_take_releases */
	size_t payload_len;
	uint8_t mp_flags; /* JASPER_MP_FLAG_* of the delivery (jasper_mp.h): late for JC_LATE,
			     gap-before when its first seq lies beyond the next one expected for
			     its (endpoint, stream) in release order (first message only) */
};

/*
 * The delivery datagram of one release (docs/mp-feed.md): a JASPER_MP_HEADER_LEN header
 * before each message, seq counting up, gap-before on the first only, release_ns as the
 * release time. Writes at most JASPER_MP_MAX_DELIVERY bytes into out[0..cap); returns the
 * length, or 0 when cap is too small. The blocks were checked by the parse; never allocates.
 */
size_t jc_frame(const struct jc_release *r, uint8_t *out, size_t cap);

/* Per-endpoint counters (names as in the Python core's counters()). */
struct jc_counters {
	uint64_t received;
	uint64_t heartbeats;
	uint64_t accepted;
	uint64_t duplicates;
	uint64_t stale;
	uint64_t released; /* messages */
	uint64_t late; /* messages */
	uint64_t hold_overflow;
	uint64_t pending_overflow;
	uint64_t gaps; /* releases flagged gap-before */
	uint64_t gap_messages; /* sequence numbers skipped by those */
	uint64_t malformed[JC_MALFORMED_REASONS]; /* by jc_parse result - 1 */
	uint64_t rejected[JC_REJECT_REASONS]; /* by enum jc_reject */
	uint64_t nomem; /* native only: dropped, an allocation failed */
	/* Loss recovery (jasper.recovery.RECOVERY_COUNTER_NAMES, docs/recovery.md). */
	uint64_t naks_sent;
	uint64_t naks_coalesced;
	uint64_t recovered; /* messages a retransmission brought before their deadline */
	uint64_t recovered_late; /* messages a retransmission brought after their deadline */
	uint64_t unrecoverable;
};

/* Parent ids tracked per endpoint; further ids (and id JC_PARENT_OTHER) count under
 * JC_PARENT_OTHER, so jc_parents reports at most JC_PARENT_SLOTS entries. */
#define JC_MAX_PARENTS 64
#define JC_PARENT_OTHER UINT32_C(0xFFFFFFFF)
#define JC_PARENT_SLOTS (JC_MAX_PARENTS + 1)

struct jc_parent {
	uint32_t id;
	uint64_t copies; /* valid copies (parsed) from this parent */
	uint64_t kept; /* of which accepted by dedup */
};

struct jc_core;

/* 0 when the config is valid, else JC_EINVAL. */
int jc_config_check(const struct jc_config *cfg);
/* A new core, or NULL (invalid config: see jc_config_check; or no memory). */
struct jc_core *jc_new(const struct jc_config *cfg);
void jc_free(struct jc_core *core);

/* ---- streams: what the core admits (jasper.receiver_core.ReceiverCore.set_stream) -------- */

/* Keys one stream holds at most (two during a rotation; four leaves room). */
#define JC_MAX_KEYS 4
#define JC_KEY_LEN 32 /* jasper.wire_spec.KEY_LEN */

struct jc_stream_key {
	uint32_t epoch; /* >= 1 */
	uint8_t key[JC_KEY_LEN];
};

/*
 * Accept copies of `stream_id` from now on, replacing what was set before. nkeys < 0: an
 * unauthenticated stream; 0..JC_MAX_KEYS: copies must carry a MAC (HMAC-SHA256 truncated, see
 * docs/wire-format.md) made with the key of their key_epoch (0 keys: every copy is refused
 * "key"). has_session: only copies of `session` are taken; else the newest session seen is
 * followed, as a dedup ring does. The core keeps no copy of the key bytes: each is keyed into
 * an HMAC context at once (the caller should OPENSSL_cleanse its own copy). JC_EINVAL: nkeys >
 * JC_MAX_KEYS, an epoch 0 or twice; JC_EFULL: max_streams reached; JC_ENOMEM; JC_ECRYPTO. On
 * an error nothing changed.
 */
int jc_set_stream(struct jc_core *core, uint32_t stream_id, const struct jc_stream_key *keys,
		  int nkeys, int has_session, uint32_t session);
/* Refuse copies of `stream_id` from now on (its keys are freed and cleansed); held entries are
 * still released, and its dedup rings and clamp floor stay. Unknown ids: nothing. */
void jc_drop_stream(struct jc_core *core, uint32_t stream_id);

/* 1 when a parsed header passes every check short of the MAC (stream set, key epoch held,
 * announced session): what the pump asks before it plans a wake-up for the copy's deadline,
 * so unauthenticated junk cannot schedule spins. The core itself still checks everything. */
int jc_may_admit(const struct jc_core *core, const struct jc_header *h);

/* Grow to n endpoints (a new plan); n < current is JC_EINVAL, n == current does nothing. */
int jc_set_endpoints(struct jc_core *core, uint32_t n);
uint32_t jc_endpoints(const struct jc_core *core);

/*
 * One copy received on `endpoint` from `parent`, with effective arrival `arrival_ns`, at node
 * time `now_ns`; then advance to now_ns. `data` is only read during the call (copied when it
 * has to wait). Malformed input is counted, never an error.
 */
int jc_datagram(struct jc_core *core, uint32_t endpoint, const uint8_t *data, size_t len,
		uint32_t parent, int64_t arrival_ns, int64_t now_ns);
/* Time passed: process due copies and release due held entries. */
int jc_advance(struct jc_core *core, int64_t now_ns);
/* Shutdown: process every pending copy as at now_ns, then release every held entry ON_TIME. */
int jc_flush(struct jc_core *core, int64_t now_ns);

/* The earliest of the next pending arrival, the next held deadline and the next NAK due: 1 and
 * *when, or 0 when nothing waits. */
int jc_get_timer(const struct jc_core *core, uint64_t *when);
/* The same as an int64: INT64_MAX when nothing waits (or the time is beyond INT64_MAX). */
int64_t jc_next_timer(const struct jc_core *core);
/* The earliest of the next pending arrival and the next held deadline only (INT64_MAX: none):
 * what a pump plans its precise wake-ups from; a NAK due needs no spin. */
int64_t jc_next_copy_timer(const struct jc_core *core);

/* Releases waiting to be taken. */
size_t jc_releases_waiting(const struct jc_core *core);
/*
 * Move up to `max` releases, oldest first, into out[]; returns how many. The payload pointers
 * stay valid until the next call of jc_take_releases, jc_datagram, jc_advance, jc_flush,
 * jc_set_endpoints or jc_free on this core (the read-only calls do not invalidate them).
 */
size_t jc_take_releases(struct jc_core *core, struct jc_release *out, size_t max);

/* Counters of one endpoint: 0, or JC_EINVAL for an endpoint out of range. */
int jc_counters(const struct jc_core *core, uint32_t endpoint, struct jc_counters *out);
/* Parents seen on one endpoint (first seen first, JC_PARENT_OTHER last) into out[0..max): the
 * number written (<= JC_PARENT_SLOTS), or JC_EINVAL for an endpoint out of range. */
int jc_parents(const struct jc_core *core, uint32_t endpoint, struct jc_parent *out, size_t max);

/* ---- loss recovery: the NAK schedule (jasper.recovery.NakTracker, docs/recovery.md) ------- */

/* When a receiver NAKs; times in ns (jasper.recovery.RecoveryConfig). */
struct jc_recovery {
	uint64_t nak_delay_ns; /* wait after a hole is seen before its first NAK */
	uint64_t nak_jitter_ns; /* uniform extra wait in [0, nak_jitter_ns], hashed (no state) */
	uint64_t retry_ns; /* wait for the retransmission before NAKing the range again */
	uint32_t attempts; /* NAKs per range, 1..65535; then it is given up */
	uint32_t max_gaps; /* open ranges kept (all endpoints), 1..2^20 */
	uint64_t seed; /* seed of the jitter draws */
};
#define JC_RECOVERY_DEFAULT {100000, 100000, 1000000, 4, 1024, 0}
/* Bound on nak_delay_ns + nak_jitter_ns and on retry_ns + nak_jitter_ns: a due time (now_ns <=
 * INT64_MAX plus one of them) always fits a uint64. */
#define JC_RECOVERY_MAX_WAIT (UINT64_C(1) << 62)
#define JC_HEAD_WINDOW 64 /* jasper.recovery.HEAD_WINDOW */
/* The longest NAK datagram: the header and JASPER_MAX_NAK_RANGES range records. */
#define JC_MAX_NAK (JASPER_HEADER_LEN + JASPER_MAX_NAK_RANGES * JASPER_NAK_RANGE_LEN)

/*
 * Recovery on (a copy of *cfg; the open ranges and the next sequence number expected per
 * endpoint and stream carry over from an earlier config) or off (cfg NULL: every open range
 * and expectation is forgotten, uncounted). Off by default. JC_EINVAL: a field out of range.
 */
int jc_set_recovery(struct jc_core *core, const struct jc_recovery *cfg);

/* One NAK to send from `endpoint`'s socket to the publisher (docs/recovery.md). */
struct jc_nak {
	uint32_t endpoint;
	uint32_t stream_id;
	uint32_t session;
	uint16_t len; /* bytes of data */
	uint8_t data[JC_MAX_NAK]; /* signed with the stream's newest key epoch, if it has keys */
};

/* NAKs waiting to be taken (they queue like releases: take them after every input call). */
size_t jc_naks_waiting(const struct jc_core *core);
/* Move up to `max` NAKs, oldest first, into out[]; returns how many. */
size_t jc_take_naks(struct jc_core *core, struct jc_nak *out, size_t max);
/* When the earliest open range wants its NAK (or to be given up): INT64_MAX when none. */
int64_t jc_next_nak(const struct jc_core *core);
size_t jc_open_gaps(const struct jc_core *core); /* ranges waiting for a copy or a NAK */

size_t jc_held(const struct jc_core *core); /* held entries */
size_t jc_pending(const struct jc_core *core); /* copies waiting for their arrival */
uint64_t jc_clamped(const struct jc_core *core); /* deadlines raised to the stream's floor */

#ifdef __cplusplus
}
#endif

#endif /* JASPER_RECEIVER_CORE_H */
