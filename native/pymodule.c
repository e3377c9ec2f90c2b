/* pymodule.c: jasper._native, the CPython binding of the native receiver core and parser. */
/*
 * jasper/receiver_core.py is the specification: same constructor, methods, return values and
 * errors (ValueError for the caller's bad arguments; malformed input is counted, never raised).
 * Releases are jasper.receiver_core.CoreRelease NamedTuples, imported on first use.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdio.h>

#include <openssl/crypto.h>

#include "jasper_mp.h"
#include "jasper_wire.h"
#include "receiver_core.h"

#define MAX_DATAGRAM (JASPER_HEADER_LEN + JASPER_MAX_PAYLOAD)
#define BASE_COUNTERS 11
#define COUNTERS (BASE_COUNTERS + JC_MALFORMED_REASONS + JC_REJECT_REASONS)
#define AT(field) (__builtin_offsetof(struct jasper_hdr, field))

/* Imported lazily (jasper.receiver_core imports nothing native, but keep import order free). */
static PyTypeObject *core_release_type;
static PyObject *core_nak_type;
static PyObject *release_kinds[4];
static PyObject *wire_error;
static PyObject *counter_names[COUNTERS];

static int load_release_types(void)
{
	if (core_release_type)
		return 0;
	PyObject *mod = PyImport_ImportModule("jasper.receiver_core");
	if (!mod)
		return -1;
	PyObject *cls = PyObject_GetAttrString(mod, "CoreRelease");
	PyObject *kind = cls ? PyObject_GetAttrString(mod, "ReleaseKind") : NULL;
	Py_DECREF(mod);
	if (!kind)
		goto fail;
	if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, &PyTuple_Type)) {
		PyErr_SetString(PyExc_TypeError, "jasper.receiver_core.CoreRelease is not a tuple type");
		goto fail;
	}
	PyObject *kinds[4];
	for (int i = 0; i < 4; i++) {
		kinds[i] = PyObject_CallFunction(kind, "i", i);
		if (!kinds[i]) {
			while (i--)
				Py_DECREF(kinds[i]);
			goto fail;
		}
	}
	Py_DECREF(kind);
	for (int i = 0; i < 4; i++)
		release_kinds[i] = kinds[i];
	core_release_type = (PyTypeObject *)cls;
	return 0;
fail:
	Py_XDECREF(cls);
	Py_XDECREF(kind);
	return -1;
}

static int int_in(PyObject *obj, long long lo, long long hi, const char *what, long long *out);

static int load_nak_type(void)
{
	if (core_nak_type)
		return 0;
	PyObject *mod = PyImport_ImportModule("jasper.receiver_core");
	if (!mod)
		return -1;
	core_nak_type = PyObject_GetAttrString(mod, "CoreNak");
	Py_DECREF(mod);
	return core_nak_type ? 0 : -1;
}

/* A jasper.recovery.RecoveryConfig (validated by its own __post_init__) as the core's. */
static int recovery_arg(PyObject *obj, struct jc_recovery *out)
{
	static const char *const u64[] = {"nak_delay_ns", "nak_jitter_ns", "retry_ns", "seed"};
	uint64_t v[4];
	for (int i = 0; i < 4; i++) {
		PyObject *a = PyObject_GetAttrString(obj, u64[i]);
		if (!a)
			return -1;
		v[i] = PyLong_AsUnsignedLongLong(a);
		Py_DECREF(a);
		if (v[i] == (uint64_t)-1 && PyErr_Occurred()) {
			PyErr_Format(PyExc_ValueError, "recovery.%s must be in 0..2^64-1", u64[i]);
			return -1;
		}
	}
	long long attempts, max_gaps;
	PyObject *a = PyObject_GetAttrString(obj, "attempts");
	int rc = a ? int_in(a, 1, 0xFFFF, "recovery.attempts", &attempts) : -1;
	Py_XDECREF(a);
	if (rc < 0)
		return -1;
	a = PyObject_GetAttrString(obj, "max_gaps");
	rc = a ? int_in(a, 1, 1 << 20, "recovery.max_gaps", &max_gaps) : -1;
	Py_XDECREF(a);
	if (rc < 0)
		return -1;
	*out = (struct jc_recovery){
		.nak_delay_ns = v[0], .nak_jitter_ns = v[1], .retry_ns = v[2],
		.attempts = (uint32_t)attempts, .max_gaps = (uint32_t)max_gaps, .seed = v[3],
	};
	const uint64_t most = JC_RECOVERY_MAX_WAIT;
	if (v[1] > most || v[0] > most - v[1] || v[2] > most - v[1]) {
		PyErr_SetString(PyExc_ValueError, "the native core takes nak_delay_ns + nak_jitter_ns "
						  "and retry_ns + nak_jitter_ns up to 2^62");
		return -1;
	}
	return 0;
}

static int load_wire_error(void)
{
	if (wire_error)
		return 0;
	PyObject *mod = PyImport_ImportModule("jasper.wire");
	if (!mod)
		return -1;
	wire_error = PyObject_GetAttrString(mod, "WireError");
	Py_DECREF(mod);
	return wire_error ? 0 : -1;
}

/* ---- argument helpers -------------------------------------------------------------------- */

/* Bytes-like `obj` as a buffer; *view is released by release_data. */
struct data_arg {
	const uint8_t *ptr;
	size_t len;
	Py_buffer view;
	int has_view;
};

static int get_data(PyObject *obj, struct data_arg *d)
{
	d->has_view = 0;
	if (PyBytes_CheckExact(obj)) {
		d->ptr = (const uint8_t *)PyBytes_AS_STRING(obj);
		d->len = (size_t)PyBytes_GET_SIZE(obj);
		return 0;
	}
	if (PyObject_GetBuffer(obj, &d->view, PyBUF_SIMPLE) < 0)
		return -1;
	d->has_view = 1;
	d->ptr = d->view.buf;
	d->len = (size_t)d->view.len;
	return 0;
}

static void release_data(struct data_arg *d)
{
	if (d->has_view)
		PyBuffer_Release(&d->view);
}

/* An int in [lo, hi]; ValueError naming `what` outside it (TypeError for a non-int). */
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

/* Fastcall arguments in the order of `names` (positional or keyword), all required. */
static int bind_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
		     const char *const *names, Py_ssize_t n, PyObject **out, const char *fname)
{
	if (nargs > n) {
		PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", fname, n, nargs);
		return -1;
	}
	for (Py_ssize_t i = 0; i < n; i++)
		out[i] = i < nargs ? args[i] : NULL;
	Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
	for (Py_ssize_t k = 0; k < nkw; k++) {
		PyObject *key = PyTuple_GET_ITEM(kwnames, k);
		Py_ssize_t i = 0;
		while (i < n && PyUnicode_CompareWithASCIIString(key, names[i]) != 0)
			i++;
		if (i == n) {
			PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R",
				     fname, key);
			return -1;
		}
		if (out[i]) {
			PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
				     fname, names[i]);
			return -1;
		}
		out[i] = args[nargs + k];
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (!out[i]) {
			PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
				     names[i]);
			return -1;
		}
	}
	return 0;
}

static int one_arg(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
		   const char *const *names, PyObject **out, const char *fname)
{
	if (nargs == 1 && !kwnames) {
		*out = args[0];
		return 0;
	}
	return bind_args(args, nargs, kwnames, names, 1, out, fname);
}

/* ---- ReceiverCore ------------------------------------------------------------------------ */

typedef struct {
	PyObject_HEAD
	struct jc_core *core;
} CoreObject;

static int check_rc(int rc)
{
	if (rc == JC_ENOMEM) {
		PyErr_NoMemory();
		return -1;
	}
	if (rc == JC_ECRYPTO) {
		PyErr_SetString(PyExc_RuntimeError, "libcrypto could not key an HMAC-SHA256");
		return -1;
	}
	if (rc) {
		PyErr_SetString(PyExc_ValueError, "invalid argument");
		return -1;
	}
	return 0;
}

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
	static char *kwlist[] = {"endpoints", "ring_size", "hold_capacity", "pending_capacity",
				 "ahead_window", "recovery", NULL};
	PyObject *endpoints = NULL, *ahead = NULL, *recovery = Py_None;
	Py_ssize_t ring_size = 4096, hold_capacity = 65536, pending_capacity = 65536;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OnnnOO:ReceiverCore", kwlist, &endpoints,
					 &ring_size, &hold_capacity, &pending_capacity, &ahead,
					 &recovery))
		return NULL;
	uint64_t ahead_window = JC_AHEAD_WINDOW;
	if (ahead) {
		if (!PyLong_Check(ahead)) {
			PyErr_Format(PyExc_TypeError, "ahead_window must be an int, got %R", ahead);
			return NULL;
		}
		int overflow = 0;
		long long v = PyLong_AsLongLongAndOverflow(ahead, &overflow);
		if (v == -1 && PyErr_Occurred())
			return NULL;
		if (overflow < 0 || (!overflow && v < 1)) {
			PyErr_Format(PyExc_ValueError, "ahead_window must be >= 1, got %R", ahead);
			return NULL;
		}
		/* Wider than any seq difference: the same as no window at all. */
		ahead_window = overflow ? UINT64_MAX : (uint64_t)v;
	}
	if (!endpoints) {
		PyErr_SetString(PyExc_TypeError,
				"ReceiverCore() missing required keyword-only argument: 'endpoints'");
		return NULL;
	}
	long long n;
	if (int_in(endpoints, 1, UINT32_MAX, "endpoints", &n) < 0)
		return NULL;
	if (ring_size < 2 || ring_size > (1LL << 31) || (ring_size & (ring_size - 1))) {
		PyErr_Format(PyExc_ValueError, "ring size must be a power of two >= 2, got %zd",
			     ring_size);
		return NULL;
	}
	if (hold_capacity < 1 || hold_capacity > (Py_ssize_t)UINT32_MAX) {
		PyErr_Format(PyExc_ValueError, "hold_capacity must be 1..%u, got %zd", UINT32_MAX,
			     hold_capacity);
		return NULL;
	}
	if (pending_capacity < 0 || pending_capacity > (Py_ssize_t)UINT32_MAX) {
		PyErr_Format(PyExc_ValueError, "pending_capacity must be 0..%u, got %zd",
			     UINT32_MAX, pending_capacity);
		return NULL;
	}
	struct jc_recovery rcfg;
	if (recovery != Py_None && recovery_arg(recovery, &rcfg) < 0)
		return NULL;
	struct jc_config cfg = {
		.endpoints = (uint32_t)n,
		.ring_size = (uint32_t)ring_size,
		.hold_capacity = (uint32_t)hold_capacity,
		.pending_capacity = (uint32_t)pending_capacity,
		.max_streams = 0,
		.ahead_window = ahead_window,
	};
	CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
	if (!self)
		return NULL;
	self->core = jc_new(&cfg);
	if (!self->core) {
		Py_DECREF(self);
		return PyErr_NoMemory();
	}
	if (recovery != Py_None && check_rc(jc_set_recovery(self->core, &rcfg)) < 0) {
		Py_DECREF(self);
		return NULL;
	}
	return (PyObject *)self;
}

static void core_dealloc(CoreObject *self)
{
	jc_free(self->core);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int endpoint_arg(CoreObject *self, PyObject *obj, uint32_t *out)
{
	int overflow = 0;
	long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
	if (v == -1 && PyErr_Occurred())
		return -1;
	uint32_t n = jc_endpoints(self->core);
	if (overflow || v < 0 || v >= (long long)n) {
		PyErr_Format(PyExc_ValueError, "endpoint %R out of range 0..%u", obj, n - 1);
		return -1;
	}
	*out = (uint32_t)v;
	return 0;
}

static int time_arg(PyObject *obj, const char *what, int64_t *out)
{
	long long v;
	if (int_in(obj, 0, INT64_MAX, what, &v) < 0)
		return -1;
	*out = (int64_t)v;
	return 0;
}

static PyObject *core_datagram_received(CoreObject *self, PyObject *const *args,
					Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"endpoint", "data", "parent", "arrival_ns", "now_ns"};
	PyObject *a[5];
	if (kwnames || nargs != 5) {
		if (bind_args(args, nargs, kwnames, names, 5, a, "datagram_received") < 0)
			return NULL;
	} else {
		for (int i = 0; i < 5; i++)
			a[i] = args[i];
	}
	uint32_t endpoint;
	long long parent;
	int64_t arrival_ns, now_ns;
	if (endpoint_arg(self, a[0], &endpoint) < 0 ||
	    int_in(a[2], 0, UINT32_MAX, "parent", &parent) < 0 ||
	    time_arg(a[3], "arrival_ns", &arrival_ns) < 0 || time_arg(a[4], "now_ns", &now_ns) < 0)
		return NULL;
	struct data_arg d;
	if (get_data(a[1], &d) < 0)
		return NULL;
	int rc = jc_datagram(self->core, endpoint, d.ptr, d.len, (uint32_t)parent, arrival_ns,
			     now_ns);
	release_data(&d);
	if (check_rc(rc) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *core_timer(CoreObject *self, PyObject *const *args, Py_ssize_t nargs,
				PyObject *kwnames)
{
	static const char *const names[] = {"now_ns"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "timer") < 0)
		return NULL;
	int64_t now_ns;
	if (time_arg(arg, "now_ns", &now_ns) < 0 || check_rc(jc_advance(self->core, now_ns)) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *core_flush(CoreObject *self, PyObject *const *args, Py_ssize_t nargs,
				PyObject *kwnames)
{
	static const char *const names[] = {"now_ns"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "flush") < 0)
		return NULL;
	int64_t now_ns;
	if (time_arg(arg, "now_ns", &now_ns) < 0 || check_rc(jc_flush(self->core, now_ns)) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *core_set_endpoints(CoreObject *self, PyObject *const *args, Py_ssize_t nargs,
				PyObject *kwnames)
{
	static const char *const names[] = {"endpoints"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "set_endpoints") < 0)
		return NULL;
	long long n;
	if (int_in(arg, 1, UINT32_MAX, "endpoints", &n) < 0)
		return NULL;
	uint32_t now = jc_endpoints(self->core);
	if ((uint32_t)n < now) {
		PyErr_Format(PyExc_ValueError, "endpoints can only grow: %u -> %lld", now, n);
		return NULL;
	}
	if (check_rc(jc_set_endpoints(self->core, (uint32_t)n)) < 0)
		return NULL;
	Py_RETURN_NONE;
}

/* set_stream's keys: a mapping key epoch -> key bytes, checked in iteration order like the
 * Python core (epoch range, then length). Returns the count, or -1 with an exception set. */
static int stream_keys(PyObject *mapping, struct jc_stream_key *out)
{
	PyObject *items = PyMapping_Items(mapping);
	if (!items)
		return -1;
	Py_ssize_t n = PyList_GET_SIZE(items);
	int got = 0;
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *item = PyList_GET_ITEM(items, i); /* borrowed: items holds it */
		if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
			PyErr_SetString(PyExc_TypeError, "keys.items() must give (epoch, key) pairs");
			goto fail;
		}
		PyObject *epoch = PyTuple_GET_ITEM(item, 0), *key = PyTuple_GET_ITEM(item, 1);
		long long e;
		if (int_in(epoch, 1, UINT32_MAX, "key epoch", &e) < 0)
			goto fail;
		Py_buffer view;
		if (PyObject_GetBuffer(key, &view, PyBUF_SIMPLE) < 0)
			goto fail;
		if (view.len != JC_KEY_LEN) {
			PyErr_Format(PyExc_ValueError, "a stream key has %d bytes, got %zd",
				     JC_KEY_LEN, view.len);
			PyBuffer_Release(&view);
			goto fail;
		}
		if (got == JC_MAX_KEYS) {
			PyBuffer_Release(&view);
			PyErr_Format(PyExc_ValueError,
				     "the native core holds at most %d keys per stream, got %zd",
				     JC_MAX_KEYS, n);
			goto fail;
		}
		out[got].epoch = (uint32_t)e;
		memcpy(out[got].key, view.buf, JC_KEY_LEN);
		PyBuffer_Release(&view);
		got++;
	}
	Py_DECREF(items);
	return got;
fail:
	Py_DECREF(items);
	OPENSSL_cleanse(out, sizeof *out * JC_MAX_KEYS);
	return -1;
}

static PyObject *core_set_stream(CoreObject *self, PyObject *args, PyObject *kwargs)
{
	static char *kwlist[] = {"stream_id", "keys", "session", NULL};
	PyObject *stream = NULL, *keys = NULL, *session = Py_None;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OO:set_stream", kwlist, &stream, &keys,
					 &session))
		return NULL;
	if (!keys) {
		PyErr_SetString(PyExc_TypeError,
				"set_stream() missing required keyword-only argument: 'keys'");
		return NULL;
	}
	long long id, sess = 0;
	if (int_in(stream, 0, UINT32_MAX, "stream", &id) < 0)
		return NULL;
	if (session != Py_None && int_in(session, 0, UINT32_MAX, "session", &sess) < 0)
		return NULL;
	struct jc_stream_key held[JC_MAX_KEYS];
	int nkeys = -1;
	if (keys != Py_None && (nkeys = stream_keys(keys, held)) < 0)
		return NULL;
	int rc = jc_set_stream(self->core, (uint32_t)id, held, nkeys, session != Py_None,
			       (uint32_t)sess);
	OPENSSL_cleanse(held, sizeof held); /* the core keyed its own HMAC contexts */
	if (check_rc(rc) < 0)
		return NULL;
	Py_RETURN_NONE;
}

static PyObject *core_drop_stream(CoreObject *self, PyObject *const *args, Py_ssize_t nargs,
				  PyObject *kwnames)
{
	static const char *const names[] = {"stream_id"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "drop_stream") < 0)
		return NULL;
	if (PyLong_Check(arg)) { /* like dict.pop(id, None): anything else names no stream */
		int overflow = 0;
		long long v = PyLong_AsLongLongAndOverflow(arg, &overflow);
		if (v == -1 && PyErr_Occurred())
			return NULL;
		if (!overflow && v >= 0 && v <= (long long)UINT32_MAX)
			jc_drop_stream(self->core, (uint32_t)v);
	}
	Py_RETURN_NONE;
}

static PyObject *core_get_timer(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
	uint64_t when;
	if (!jc_get_timer(self->core, &when))
		Py_RETURN_NONE;
	return PyLong_FromUnsignedLongLong(when);
}

static PyObject *make_release(const struct jc_release *r)
{
	PyObject *t = core_release_type->tp_alloc(core_release_type, 13);
	if (!t)
		return NULL;
	PyObject *items[13] = {
		PyLong_FromUnsignedLong(r->endpoint),
		PyLong_FromUnsignedLong(r->parent),
		PyLong_FromUnsignedLong(r->stream_id),
		PyLong_FromUnsignedLong(r->session),
		PyLong_FromUnsignedLongLong(r->seq),
		PyLong_FromUnsignedLong(r->count),
		Py_NewRef(release_kinds[r->kind & 3]),
		PyLong_FromUnsignedLongLong(r->deadline_ns),
		PyLong_FromUnsignedLongLong(r->send_ns),
		PyLong_FromLongLong(r->arrival_ns),
		PyLong_FromLongLong(r->release_ns),
		PyBytes_FromStringAndSize((const char *)r->payload, (Py_ssize_t)r->payload_len),
		PyLong_FromUnsignedLong(r->mp_flags),
	};
	int failed = 0;
	for (int i = 0; i < 13; i++) {
		if (!items[i])
			failed = 1;
		PyTuple_SET_ITEM(t, i, items[i]); /* NULL items are fine for the tuple's dealloc */
	}
	if (failed) {
		Py_DECREF(t);
		return NULL;
	}
	return t;
}

static PyObject *core_releases(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
	if (load_release_types() < 0)
		return NULL;
	size_t n = jc_releases_waiting(self->core);
	PyObject *list = PyList_New((Py_ssize_t)n);
	if (!list)
		return NULL;
	struct jc_release batch[64];
	size_t done = 0;
	while (done < n) {
		size_t got = jc_take_releases(self->core, batch, 64);
		for (size_t i = 0; i < got; i++) {
			PyObject *t = make_release(&batch[i]);
			if (!t) {
				/* The rest of this batch is lost with the error; the core stays sound. */
				Py_DECREF(list);
				return NULL;
			}
			PyList_SET_ITEM(list, (Py_ssize_t)(done + i), t);
		}
		done += got;
	}
	return list;
}

static PyObject *core_naks(CoreObject *self, PyObject *Py_UNUSED(ignored))
{
	if (load_nak_type() < 0)
		return NULL;
	PyObject *list = PyList_New(0);
	if (!list)
		return NULL;
	struct jc_nak batch[8];
	size_t got;
	while ((got = jc_take_naks(self->core, batch, 8)) > 0) {
		for (size_t i = 0; i < got; i++) {
			const struct jc_nak *k = &batch[i];
			PyObject *t = PyObject_CallFunction(core_nak_type, "IIIy#", k->endpoint,
							    k->stream_id, k->session,
							    (const char *)k->data, (Py_ssize_t)k->len);
			/* On an error the rest of this batch is lost with it; the core stays sound. */
			if (!t || PyList_Append(list, t) < 0) {
				Py_XDECREF(t);
				Py_DECREF(list);
				return NULL;
			}
			Py_DECREF(t);
		}
	}
	return list;
}

static PyObject *core_counters(CoreObject *self, PyObject *const *args, Py_ssize_t nargs,
				PyObject *kwnames)
{
	static const char *const names[] = {"endpoint"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "counters") < 0)
		return NULL;
	uint32_t endpoint;
	struct jc_counters c;
	if (endpoint_arg(self, arg, &endpoint) < 0)
		return NULL;
	jc_counters(self->core, endpoint, &c);
	uint64_t values[COUNTERS] = {
		c.received, c.heartbeats, c.accepted, c.duplicates, c.stale,
		c.released, c.late, c.hold_overflow, c.pending_overflow, c.gaps, c.gap_messages,
	};
	for (int i = 0; i < JC_MALFORMED_REASONS; i++)
		values[BASE_COUNTERS + i] = c.malformed[i];
	for (int i = 0; i < JC_REJECT_REASONS; i++)
		values[BASE_COUNTERS + JC_MALFORMED_REASONS + i] = c.rejected[i];
	PyObject *d = PyDict_New();
	if (!d)
		return NULL;
	for (int i = 0; i < COUNTERS; i++) {
		PyObject *v = PyLong_FromUnsignedLongLong(values[i]);
		if (!v || PyDict_SetItem(d, counter_names[i], v) < 0) {
			Py_XDECREF(v);
			Py_DECREF(d);
			return NULL;
		}
		Py_DECREF(v);
	}
	return d;
}

static PyObject *core_recovery_counters(CoreObject *self, PyObject *const *args,
					 Py_ssize_t nargs, PyObject *kwnames)
{
	static const char *const names[] = {"endpoint"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "recovery_counters") < 0)
		return NULL;
	uint32_t endpoint;
	struct jc_counters c;
	if (endpoint_arg(self, arg, &endpoint) < 0)
		return NULL;
	jc_counters(self->core, endpoint, &c);
	/* jasper.recovery.RECOVERY_COUNTER_NAMES, in order. */
	return Py_BuildValue("{sKsKsKsKsK}", "naks_sent", (unsigned long long)c.naks_sent,
			     "naks_coalesced", (unsigned long long)c.naks_coalesced, "recovered",
			     (unsigned long long)c.recovered, "recovered_late",
			     (unsigned long long)c.recovered_late, "unrecoverable",
			     (unsigned long long)c.unrecoverable);
}

static PyObject *core_parents(CoreObject *self, PyObject *const *args, Py_ssize_t nargs,
				PyObject *kwnames)
{
	static const char *const names[] = {"endpoint"};
	PyObject *arg;
	if (one_arg(args, nargs, kwnames, names, &arg, "parents") < 0)
		return NULL;
	uint32_t endpoint;
	struct jc_parent p[JC_PARENT_SLOTS];
	if (endpoint_arg(self, arg, &endpoint) < 0)
		return NULL;
	int n = jc_parents(self->core, endpoint, p, JC_PARENT_SLOTS);
	PyObject *d = PyDict_New();
	if (!d)
		return NULL;
	for (int i = 0; i < n; i++) {
		PyObject *k = PyLong_FromUnsignedLong(p[i].id);
		PyObject *v = Py_BuildValue("(KK)", (unsigned long long)p[i].copies,
					    (unsigned long long)p[i].kept);
		if (!k || !v || PyDict_SetItem(d, k, v) < 0) {
			Py_XDECREF(k);
			Py_XDECREF(v);
			Py_DECREF(d);
			return NULL;
		}
		Py_DECREF(k);
		Py_DECREF(v);
	}
	return d;
}

static PyObject *core_get_endpoints(CoreObject *self, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLong(jc_endpoints(self->core));
}

static PyObject *core_get_held(CoreObject *self, void *Py_UNUSED(closure))
{
	return PyLong_FromSize_t(jc_held(self->core));
}

static PyObject *core_get_pending(CoreObject *self, void *Py_UNUSED(closure))
{
	return PyLong_FromSize_t(jc_pending(self->core));
}

static PyObject *core_get_clamped(CoreObject *self, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLongLong(jc_clamped(self->core));
}

static PyObject *core_get_open_gaps(CoreObject *self, void *Py_UNUSED(closure))
{
	return PyLong_FromSize_t(jc_open_gaps(self->core));
}

static PyMethodDef core_methods[] = {
	{"datagram_received", (PyCFunction)(void (*)(void))core_datagram_received,
	 METH_FASTCALL | METH_KEYWORDS,
	 "datagram_received(endpoint, data, parent, arrival_ns, now_ns)\n--\n\n"
	 "One copy for `endpoint` from `parent` with effective arrival `arrival_ns`; then "
	 "advance to `now_ns`."},
	{"timer", (PyCFunction)(void (*)(void))core_timer, METH_FASTCALL | METH_KEYWORDS,
	 "timer(now_ns)\n--\n\nTime passed: process due copies and release due messages."},
	{"flush", (PyCFunction)(void (*)(void))core_flush, METH_FASTCALL | METH_KEYWORDS,
	 "flush(now_ns)\n--\n\nShutdown: process every pending copy, release every held one."},
	{"set_endpoints", (PyCFunction)(void (*)(void))core_set_endpoints, METH_FASTCALL | METH_KEYWORDS,
	 "set_endpoints(endpoints)\n--\n\nA new plan: grow to `endpoints` endpoints."},
	{"set_stream", (PyCFunction)(void (*)(void))core_set_stream, METH_VARARGS | METH_KEYWORDS,
	 "set_stream(stream_id, *, keys, session=None)\n--\n\n"
	 "Accept copies of `stream_id`: keys {epoch: 32-byte key} (at most 4) or None for an "
	 "unauthenticated stream; session: the announced publisher session, or None."},
	{"drop_stream", (PyCFunction)(void (*)(void))core_drop_stream, METH_FASTCALL | METH_KEYWORDS,
	 "drop_stream(stream_id)\n--\n\nRefuse copies of `stream_id` from now on."},
	{"get_timer", (PyCFunction)core_get_timer, METH_NOARGS,
	 "get_timer()\n--\n\nThe next pending arrival or held deadline in ns, or None."},
	{"releases", (PyCFunction)core_releases, METH_NOARGS,
	 "releases()\n--\n\nEvery release since the last call (CoreRelease), in order."},
	{"naks", (PyCFunction)core_naks, METH_NOARGS,
	 "naks()\n--\n\nEvery NAK due since the last call (CoreNak), in the order they became due."},
	{"counters", (PyCFunction)(void (*)(void))core_counters, METH_FASTCALL | METH_KEYWORDS,
	 "counters(endpoint)\n--\n\nThe counters of one endpoint."},
	{"recovery_counters", (PyCFunction)(void (*)(void))core_recovery_counters,
	 METH_FASTCALL | METH_KEYWORDS,
	 "recovery_counters(endpoint)\n--\n\nThe loss-recovery counters of one endpoint."},
	{"parents", (PyCFunction)(void (*)(void))core_parents, METH_FASTCALL | METH_KEYWORDS,
	 "parents(endpoint)\n--\n\n(copies, kept) per parent id seen by one endpoint."},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef core_getset[] = {
	{"endpoints", (getter)core_get_endpoints, NULL, "Endpoints as set now.", NULL},
	{"held", (getter)core_get_held, NULL, "Datagrams held until their deadline.", NULL},
	{"pending", (getter)core_get_pending, NULL, "Copies waiting for their arrival.", NULL},
	{"clamped", (getter)core_get_clamped, NULL, "Held deadlines raised to the stream's floor.",
	 NULL},
	{"open_gaps", (getter)core_get_open_gaps, NULL,
	 "Ranges of missing sequence numbers waiting for a copy or a NAK.", NULL},
	{NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "jasper._native.ReceiverCore",
	.tp_basicsize = sizeof(CoreObject),
	.tp_dealloc = (destructor)core_dealloc,
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "ReceiverCore(*, endpoints, ring_size=4096, hold_capacity=65536, "
		  "pending_capacity=65536, ahead_window=1 << 20, recovery=None)\n--\n\n"
		  "The receiver core in C; jasper.receiver_core.ReceiverCore is its specification.",
	.tp_methods = core_methods,
	.tp_getset = core_getset,
	.tp_new = core_new,
};

/* ---- peek -------------------------------------------------------------------------------- */

/* The detail text of overlay.fastwire.peek for a datagram jc_parse rejected with `rc`. */
static void wire_detail(const uint8_t *p, size_t n, int rc, char *out, size_t size)
{
	const size_t hl = JASPER_HEADER_LEN, bl = JASPER_BLOCK_HEADER_LEN;
	if (rc == JC_MALFORMED_SHORT) {
		snprintf(out, size, "%zu bytes, header needs %zu", n, hl);
		return;
	}
	unsigned magic = (unsigned)p[AT(magic)] << 8 | p[AT(magic) + 1];
	unsigned version = p[AT(version)], flags = p[AT(flags)];
	size_t plen = (size_t)p[AT(payload_len)] << 8 | p[AT(payload_len) + 1];
	size_t count = (size_t)p[AT(msg_count)] << 8 | p[AT(msg_count) + 1];
	switch (rc) {
	case JC_MALFORMED_MAGIC:
		snprintf(out, size, "0x%04x", magic);
		return;
	case JC_MALFORMED_VERSION:
		snprintf(out, size, "%u", version);
		return;
	case JC_MALFORMED_FLAGS:
		snprintf(out, size, "unknown flags 0x%02x", flags);
		return;
	case JC_MALFORMED_LENGTH:
		if (plen != n - hl)
			snprintf(out, size, "payload_len %zu, got %zu bytes", plen, n - hl);
		else
			snprintf(out, size, "payload_len %zu exceeds %d", plen, JASPER_MAX_PAYLOAD);
		return;
	default:
		break;
	}
	if (flags & JASPER_FLAG_HEARTBEAT) {
		snprintf(out, size, "heartbeat with %zu messages, %zu bytes", count, plen);
	} else if (count == 0) {
		snprintf(out, size, "data datagram with no messages");
	} else if (count == 1) {
		size_t length = plen >= bl ? ((size_t)p[hl] << 8 | p[hl + 1]) : 0;
		if (plen < bl)
			snprintf(out, size, "block 0 of 1 starts past the end at %zu", hl);
		else if (length > plen - bl)
			snprintf(out, size, "block 0 of 1: %zu bytes, datagram %zu", length, n);
		else
			snprintf(out, size, "%zu bytes after the block", plen - bl - length);
	} else {
		size_t at = hl;
		for (size_t i = 0; i < count; i++) {
			if (at + bl > n) {
				snprintf(out, size, "block %zu of %zu starts past the end at %zu", i,
					 count, at);
				return;
			}
			at += bl + ((size_t)p[at] << 8 | p[at + 1]);
			if (at > n) {
				snprintf(out, size, "block %zu of %zu runs past the end, datagram %zu",
					 i, count, n);
				return;
			}
		}
		snprintf(out, size, "%zu bytes after the last of %zu blocks", n - at, count);
	}
}

static PyObject *native_peek(PyObject *Py_UNUSED(module), PyObject *arg)
{
	struct data_arg d;
	if (get_data(arg, &d) < 0)
		return NULL;
	struct jc_header h;
	int rc = jc_parse(d.ptr, d.len, &h);
	if (rc) {
		char detail[128];
		wire_detail(d.ptr, d.len, rc, detail, sizeof detail);
		release_data(&d);
		if (load_wire_error() < 0)
			return NULL;
		PyObject *err = PyObject_CallFunction(wire_error, "ss", jc_malformed_reason[rc - 1],
						      detail);
		if (err) {
			PyErr_SetObject(wire_error, err);
			Py_DECREF(err);
		}
		return NULL;
	}
	release_data(&d);
	return Py_BuildValue("(IIIIKKKI)", (unsigned)h.flags, (unsigned)h.stream_id,
			     (unsigned)h.session, (unsigned)h.plan_epoch, (unsigned long long)h.seq,
			     (unsigned long long)h.send_time_ns, (unsigned long long)h.deadline_ns,
			     (unsigned)h.msg_count);
}

/* frame(release): jc_frame of a CoreRelease, for the tests that hold it to jasper.mp_spec. */
static PyObject *native_frame(PyObject *Py_UNUSED(module), PyObject *arg)
{
	unsigned int endpoint, parent, stream, session, count, flags;
	unsigned long long seq, deadline, sent;
	long long arrival, release;
	PyObject *kind;
	Py_buffer payload;
	if (!PyArg_ParseTuple(arg, "IIIIKIOKKLLy*I:frame", &endpoint, &parent, &stream, &session,
			      &seq, &count, &kind, &deadline, &sent, &arrival, &release, &payload,
			      &flags))
		return NULL;
	struct jc_release r = {
		.endpoint = endpoint, .parent = parent, .stream_id = stream, .session = session,
		.seq = seq, .count = (uint16_t)count, .deadline_ns = deadline, .send_ns = sent,
		.arrival_ns = arrival, .release_ns = release, .payload = payload.buf,
		.payload_len = (size_t)payload.len, .mp_flags = (uint8_t)flags,
	};
	PyObject *out = PyBytes_FromStringAndSize(NULL, JASPER_MP_MAX_DELIVERY);
	if (!out) {
		PyBuffer_Release(&payload);
		return NULL;
	}
	size_t n = jc_frame(&r, (uint8_t *)PyBytes_AS_STRING(out), JASPER_MP_MAX_DELIVERY);
	PyBuffer_Release(&payload);
	if (n == 0 && count) {
		Py_DECREF(out);
		PyErr_SetString(PyExc_ValueError, "blocks do not match the count");
		return NULL;
	}
	_PyBytes_Resize(&out, (Py_ssize_t)n);
	return out;
}

static PyMethodDef module_methods[] = {
	{"frame", (PyCFunction)native_frame, METH_O,
	 "frame(release)\n--\n\nThe MP delivery datagram of a CoreRelease (jc_frame)."},
	{"peek", (PyCFunction)native_peek, METH_O,
	 "peek(data)\n--\n\nThe header fields like overlay.fastwire.peek: (flags, stream_id, "
	 "session, plan_epoch, seq, send_time_ns, deadline_ns, msg_count); raises "
	 "jasper.wire.WireError on a malformed datagram."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "jasper._native",
	.m_doc = "The native receiver core (native/receiver_core.c) and datagram parser.",
	.m_size = -1,
	.m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
	static const char *const base[BASE_COUNTERS] = {
		"received", "heartbeats", "accepted", "duplicates", "stale", "released",
		"late", "hold_overflow", "pending_overflow", "gaps", "gap_messages",
	};
	for (int i = 0; i < COUNTERS; i++) {
		if (counter_names[i])
			continue;
		int r = i - BASE_COUNTERS - JC_MALFORMED_REASONS;
		counter_names[i] =
			i < BASE_COUNTERS ? PyUnicode_InternFromString(base[i])
			: r < 0 ? PyUnicode_FromFormat("malformed_%s",
						       jc_malformed_reason[i - BASE_COUNTERS])
				: PyUnicode_FromFormat("rejected_%s", jc_reject_reason[r]);
		if (!counter_names[i])
			return NULL;
		if (i >= BASE_COUNTERS)
			PyUnicode_InternInPlace(&counter_names[i]);
	}
	if (PyType_Ready(&CoreType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&native_module);
	if (!m)
		return NULL;
	PyObject *other = PyLong_FromUnsignedLong(JC_PARENT_OTHER);
	if (!other || PyModule_AddObjectRef(m, "ReceiverCore", (PyObject *)&CoreType) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_PARENTS", JC_MAX_PARENTS) < 0 ||
	    PyModule_AddObjectRef(m, "PARENT_OTHER", other) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM) < 0) {
		Py_XDECREF(other);
		Py_DECREF(m);
		return NULL;
	}
	Py_DECREF(other);
	return m;
}
