/* _ng2: the server side of an HTTP/2 connection on libnghttp2, for proxy/edge/h2native.py.
 *
 * Theory of operation
 * -------------------
 * One Session wraps one nghttp2 server session, sans-I/O like the `h2` library it
 * replaces: bytes from the client go in (`receive`), bytes for the client come out
 * (`send`), and what happened comes out as a list of small tuples (`events`):
 *
 *   (EV_REQUEST, stream_id, [(name, value), ...], ended)   a complete request head
 *   (EV_DATA, stream_id, bytes)                             a chunk of request body
 *   (EV_END, stream_id)                                     the client ended the stream
 *   (EV_RESET, stream_id, code)                             RST_STREAM from the client
 *   (EV_RESET_SENT, stream_id, code)                        RST_STREAM sent (not NO_ERROR)
 *   (EV_CLOSED, stream_id, code)                            the stream is over, both sides
 *   (EV_CONTROL, 0)                   PING, SETTINGS, PRIORITY or an unknown frame arrived
 *   (EV_EMPTY_DATA, stream_id)        a DATA frame with no payload and no END_STREAM
 *   (EV_GOAWAY, 0, code)              the client sent GOAWAY
 *
 * Python answers a stream with `respond` (the head; with or without a body) and `write`
 * (body pieces, the last one with end=True). Body bytes wait in a per-stream queue that
 * an nghttp2 data provider reads from; an empty queue defers the stream and `write`
 * resumes it, so nghttp2 sends DATA only within the peer's windows. `pending` tells how
 * many body bytes of a stream still wait (Python pauses the app's side above a mark).
 *
 * Request DATA is acknowledged (WINDOW_UPDATE) only when Python calls `consume`, so a
 * paused flow stops the client (end-to-end flow control); padding and DATA for closed
 * streams are consumed by nghttp2 itself.
 *
 * Bounds here: nghttp2's own (HPACK, frame sizes, stream states, flow-control
 * violations, HTTP messaging rules, MAX_CONCURRENT_STREAMS, the queue of PING/SETTINGS
 * acks, CONTINUATION frames per header block), plus a header list larger than
 * `max_header_list` resets its stream, and more than 64 CONTINUATION frames in one header
 * block end the connection (as with `h2`). The budgets per time window (resets, control
 * frames, empty DATA) are kept in Python from the events, the same for both engines.
 * `incomplete` says whether the bytes so far stop inside a frame or a header block
 * (Python bounds that time with header_timeout).
 *
 * When a stream's END_STREAM is sent before the client ended its side (an early
 * answer), the stream is reset with NO_ERROR once the END_STREAM is out (RFC 9113 8.1).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <nghttp2/nghttp2.h>
#include <string.h>

enum {
    EV_REQUEST = 1,
    EV_DATA = 2,
    EV_END = 3,
    EV_RESET = 4,
    EV_RESET_SENT = 5,
    EV_CLOSED = 6,
    EV_CONTROL = 7,
    EV_EMPTY_DATA = 8,
    EV_GOAWAY = 9,
};

#define MAX_CONTINUATIONS 64
#define SEEN_BITS 4096 /* request streams remembered below the highest (odd ids) */

static PyObject *Ng2Error;
static PyObject *control_event; /* (EV_CONTROL, 0), shared */

/* The body bytes of one response waiting to be sent. */
typedef struct outbuf {
    PyObject **items; /* bytes objects, [head, tail) */
    size_t head, tail, cap;
    size_t offset; /* into items[head] */
    Py_ssize_t pending;
    int eof;
    int32_t stream_id;
    struct outbuf *prev, *next; /* every live buffer of the session */
} outbuf;

typedef struct {
    PyObject_HEAD
    nghttp2_session *session;
    PyObject *events;      /* list */
    PyObject *headers;     /* the header list being received, or NULL */
    int32_t headers_sid;
    size_t headers_size;
    int headers_over;      /* the header list went beyond max_header_list */
    size_t max_header_list;
    int continuations;     /* CONTINUATION frames in the current header block */
    int32_t highest;       /* the highest stream id a request HEADERS opened */
    uint64_t seen[SEEN_BITS / 64]; /* which of the last SEEN_BITS odd ids were opened */
    outbuf *buffers;
    char *out;             /* the output being collected by send() */
    size_t out_len, out_cap;
    /* frame boundaries in the client's bytes (like h2server.FrameTracker) */
    size_t skip;           /* bytes left of the current frame (or the preface) */
    unsigned char fhead[9];
    int fhead_len;
    int in_block;
    int failed;            /* a Python error happened inside a callback */
} Session;

/* -- helpers ---------------------------------------------------------------------- */

static int emit(Session *self, PyObject *event) {
    if (event == NULL) {
        self->failed = 1;
        return -1;
    }
    int rv = PyList_Append(self->events, event);
    Py_DECREF(event);
    if (rv < 0) {
        self->failed = 1;
        return -1;
    }
    return 0;
}

static void outbuf_free(Session *self, outbuf *ob) {
    for (size_t i = ob->head; i < ob->tail; i++) {
        Py_DECREF(ob->items[i]);
    }
    PyMem_Free(ob->items);
    if (ob->prev) {
        ob->prev->next = ob->next;
    } else {
        self->buffers = ob->next;
    }
    if (ob->next) {
        ob->next->prev = ob->prev;
    }
    PyMem_Free(ob);
}

static int outbuf_push(outbuf *ob, PyObject *piece) {
    if (ob->tail == ob->cap) {
        if (ob->head > 0) {
            memmove(ob->items, ob->items + ob->head, (ob->tail - ob->head) * sizeof(PyObject *));
            ob->tail -= ob->head;
            ob->head = 0;
        }
        if (ob->tail == ob->cap) {
            size_t cap = ob->cap ? ob->cap * 2 : 4;
            PyObject **items = PyMem_Realloc(ob->items, cap * sizeof(PyObject *));
            if (items == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            ob->items = items;
            ob->cap = cap;
        }
    }
    Py_INCREF(piece);
    ob->items[ob->tail++] = piece;
    ob->pending += PyBytes_GET_SIZE(piece);
    return 0;
}

/* The client opened stream `sid` (odd): remember it, forget the ids it skipped. */
static void mark_opened(Session *self, int32_t sid) {
    if (sid <= self->highest) {
        return;
    }
    if ((sid - self->highest) / 2 >= SEEN_BITS) {
        memset(self->seen, 0, sizeof self->seen);
    } else {
        for (int32_t id = self->highest + 2; id < sid; id += 2) {
            uint32_t bit = (uint32_t)(id / 2) % SEEN_BITS;
            self->seen[bit / 64] &= ~((uint64_t)1 << (bit % 64));
        }
    }
    uint32_t bit = (uint32_t)(sid / 2) % SEEN_BITS;
    self->seen[bit / 64] |= (uint64_t)1 << (bit % 64);
    self->highest = sid;
}

/* HEADERS on a lower odd id than the highest opened: trailers of a stream that was
 * open (nghttp2 ignores them once the stream is closed), or a stream id that skips
 * back, which RFC 9113 5.1.1 makes a connection error (nghttp2 would ignore it too). */
static int skips_back(Session *self, int32_t sid) {
    if (sid % 2 == 0 || sid >= self->highest) {
        return 0;
    }
    if ((self->highest - sid) / 2 >= SEEN_BITS) {
        return 1;
    }
    uint32_t bit = (uint32_t)(sid / 2) % SEEN_BITS;
    return !(self->seen[bit / 64] & ((uint64_t)1 << (bit % 64)));
}

/* -- nghttp2 callbacks -------------------------------------------------------------- */

static int on_begin_frame(nghttp2_session *session, const nghttp2_frame_hd *hd, void *user) {
    Session *self = user;
    (void)session;
    switch (hd->type) {
    case NGHTTP2_DATA:
        if (hd->length == 0 && !(hd->flags & NGHTTP2_FLAG_END_STREAM)) {
            return emit(self, Py_BuildValue("(ii)", EV_EMPTY_DATA, hd->stream_id)) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
        }
        return 0;
    case NGHTTP2_HEADERS:
        self->continuations = 0;
        if (skips_back(self, hd->stream_id)) {
            nghttp2_session_terminate_session(session, NGHTTP2_PROTOCOL_ERROR);
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        return 0;
    case NGHTTP2_CONTINUATION:
        if (++self->continuations > MAX_CONTINUATIONS) {
            nghttp2_session_terminate_session(session, NGHTTP2_ENHANCE_YOUR_CALM);
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
        return 0;
    case NGHTTP2_PING:
    case NGHTTP2_SETTINGS:
        if (hd->flags & NGHTTP2_FLAG_ACK) {
            return 0;
        }
        break;
    case NGHTTP2_PRIORITY:
        break;
    case NGHTTP2_RST_STREAM:
    case NGHTTP2_PUSH_PROMISE:
    case NGHTTP2_GOAWAY:
    case NGHTTP2_WINDOW_UPDATE:
        return 0;
    default: /* extension frames nghttp2 knows (ALTSVC, ORIGIN, ...): counted by track_frames */
        return 0;
    }
    Py_INCREF(control_event);
    return emit(self, control_event) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static int on_begin_headers(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
    Session *self = user;
    (void)session;
    if (frame->hd.type != NGHTTP2_HEADERS) {
        return 0;
    }
    Py_CLEAR(self->headers);
    self->headers_sid = frame->hd.stream_id;
    self->headers_size = 0;
    self->headers_over = 0;
    if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        mark_opened(self, frame->hd.stream_id);
        self->headers = PyList_New(0);
        if (self->headers == NULL) {
            self->failed = 1;
            return NGHTTP2_ERR_CALLBACK_FAILURE;
        }
    }
    return 0;
}

static int on_header(nghttp2_session *session, const nghttp2_frame *frame, nghttp2_rcbuf *name,
                     nghttp2_rcbuf *value, uint8_t flags, void *user) {
    Session *self = user;
    (void)session;
    (void)flags;
    nghttp2_vec n = nghttp2_rcbuf_get_buf(name), v = nghttp2_rcbuf_get_buf(value);
    self->headers_size += n.len + v.len + 32; /* as SETTINGS_MAX_HEADER_LIST_SIZE counts */
    if (self->headers_size > self->max_header_list) {
        self->headers_over = 1;
        Py_CLEAR(self->headers);
        /* nghttp2 resets the stream (it keeps decoding HPACK for the connection) */
        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    if (self->headers == NULL || frame->hd.stream_id != self->headers_sid) {
        return 0; /* trailers: only their size counts */
    }
    PyObject *pair = Py_BuildValue("(y#y#)", n.base, (Py_ssize_t)n.len, v.base, (Py_ssize_t)v.len);
    if (pair == NULL || PyList_Append(self->headers, pair) < 0) {
        Py_XDECREF(pair);
        self->failed = 1;
        return NGHTTP2_ERR_CALLBACK_FAILURE;
    }
    Py_DECREF(pair);
    return 0;
}

static int on_frame_recv(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
    Session *self = user;
    (void)session;
    int32_t sid = frame->hd.stream_id;
    int ended = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    switch (frame->hd.type) {
    case NGHTTP2_HEADERS:
        if (frame->headers.cat == NGHTTP2_HCAT_REQUEST && self->headers != NULL && sid == self->headers_sid) {
            PyObject *headers = self->headers;
            self->headers = NULL;
            PyObject *event = Py_BuildValue("(iiNO)", EV_REQUEST, sid, headers, ended ? Py_True : Py_False);
            return emit(self, event) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
        }
        if (ended && frame->headers.cat == NGHTTP2_HCAT_HEADERS) { /* trailers */
            return emit(self, Py_BuildValue("(ii)", EV_END, sid)) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
        }
        return 0;
    case NGHTTP2_DATA:
        if (ended) {
            return emit(self, Py_BuildValue("(ii)", EV_END, sid)) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
        }
        return 0;
    case NGHTTP2_RST_STREAM:
        return emit(self, Py_BuildValue("(iiI)", EV_RESET, sid, frame->rst_stream.error_code))
            ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
    case NGHTTP2_GOAWAY:
        return emit(self, Py_BuildValue("(iiI)", EV_GOAWAY, 0, frame->goaway.error_code))
            ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
    default:
        return 0;
    }
}

static int on_data_chunk(nghttp2_session *session, uint8_t flags, int32_t sid, const uint8_t *data,
                         size_t len, void *user) {
    Session *self = user;
    (void)session;
    (void)flags;
    return emit(self, Py_BuildValue("(iiy#)", EV_DATA, sid, data, (Py_ssize_t)len))
        ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static int on_frame_send(nghttp2_session *session, const nghttp2_frame *frame, void *user) {
    Session *self = user;
    int32_t sid = frame->hd.stream_id;
    if (frame->hd.type == NGHTTP2_RST_STREAM) {
        if (frame->rst_stream.error_code != NGHTTP2_NO_ERROR) {
            return emit(self, Py_BuildValue("(iiI)", EV_RESET_SENT, sid, frame->rst_stream.error_code))
                ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
        }
        return 0;
    }
    if ((frame->hd.type == NGHTTP2_DATA || frame->hd.type == NGHTTP2_HEADERS)
        && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
        && nghttp2_session_get_stream_remote_close(session, sid) == 0) {
        /* answered before the client finished its body (RFC 9113 8.1) */
        nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, sid, NGHTTP2_NO_ERROR);
    }
    return 0;
}

static int on_stream_close(nghttp2_session *session, int32_t sid, uint32_t code, void *user) {
    Session *self = user;
    outbuf *ob = nghttp2_session_get_stream_user_data(session, sid);
    if (ob != NULL) {
        nghttp2_session_set_stream_user_data(session, sid, NULL);
        outbuf_free(self, ob);
    }
    if (self->headers != NULL && self->headers_sid == sid) {
        Py_CLEAR(self->headers);
    }
    return emit(self, Py_BuildValue("(iiI)", EV_CLOSED, sid, code)) ? NGHTTP2_ERR_CALLBACK_FAILURE : 0;
}

static ssize_t read_body(nghttp2_session *session, int32_t sid, uint8_t *buf, size_t length,
                         uint32_t *flags, nghttp2_data_source *source, void *user) {
    (void)session;
    (void)sid;
    (void)user;
    outbuf *ob = source->ptr;
    size_t n = 0;
    while (n < length && ob->head < ob->tail) {
        PyObject *piece = ob->items[ob->head];
        size_t size = (size_t)PyBytes_GET_SIZE(piece) - ob->offset;
        size_t take = size < length - n ? size : length - n;
        memcpy(buf + n, PyBytes_AS_STRING(piece) + ob->offset, take);
        n += take;
        if (take == size) {
            Py_DECREF(piece);
            ob->head++;
            ob->offset = 0;
        } else {
            ob->offset += take;
        }
    }
    ob->pending -= (Py_ssize_t)n;
    if (ob->head == ob->tail) {
        ob->head = ob->tail = 0;
        if (ob->eof) {
            *flags |= NGHTTP2_DATA_FLAG_EOF;
            return (ssize_t)n;
        }
        if (n == 0) {
            return NGHTTP2_ERR_DEFERRED;
        }
    }
    return (ssize_t)n;
}

/* -- the Session type --------------------------------------------------------------- */

static void Session_dealloc(Session *self) {
    if (self->session) {
        nghttp2_session_del(self->session);
    }
    while (self->buffers) {
        outbuf_free(self, self->buffers);
    }
    Py_XDECREF(self->events);
    Py_XDECREF(self->headers);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Session_init(Session *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_streams", "max_header_list", "initial_window", "connection_window",
                             "max_outbound_ack", NULL};
    unsigned int max_streams = 100, initial_window = 65535, connection_window = 65535;
    Py_ssize_t max_header_list = 65536, max_ack = 1000;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|InIIn", kwlist, &max_streams, &max_header_list,
                                     &initial_window, &connection_window, &max_ack)) {
        return -1;
    }
    if (self->session != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Session already initialised");
        return -1;
    }
    self->events = PyList_New(0);
    if (self->events == NULL) {
        return -1;
    }
    self->max_header_list = (size_t)max_header_list;
    self->skip = NGHTTP2_CLIENT_MAGIC_LEN;

    nghttp2_session_callbacks *cb;
    if (nghttp2_session_callbacks_new(&cb) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    nghttp2_session_callbacks_set_on_begin_frame_callback(cb, on_begin_frame);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
    nghttp2_session_callbacks_set_on_header_callback2(cb, on_header);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data_chunk);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, on_frame_send);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
    nghttp2_option *opt;
    if (nghttp2_option_new(&opt) != 0) {
        nghttp2_session_callbacks_del(cb);
        PyErr_NoMemory();
        return -1;
    }
    nghttp2_option_set_no_auto_window_update(opt, 1);
    nghttp2_option_set_max_outbound_ack(opt, (size_t)max_ack);
#ifdef NG2_HAVE_MAX_CONTINUATIONS
    /* libnghttp2 1.61 (and distributions' security updates of older ones) count
     * CONTINUATION frames themselves (default 8); Bastion's own count (on_begin_frame)
     * keeps the same bound where they do not. */
    nghttp2_option_set_max_continuations(opt, MAX_CONTINUATIONS);
#endif
    int rv = nghttp2_session_server_new2(&self->session, cb, self, opt);
    nghttp2_option_del(opt);
    nghttp2_session_callbacks_del(cb);
    if (rv != 0) {
        PyErr_Format(Ng2Error, "nghttp2_session_server_new2: %s", nghttp2_strerror(rv));
        return -1;
    }
    nghttp2_settings_entry settings[] = {
        {NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, max_streams},
        {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, (uint32_t)max_header_list},
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, initial_window},
        {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
    };
    rv = nghttp2_submit_settings(self->session, NGHTTP2_FLAG_NONE, settings, 4);
    if (rv == 0 && connection_window > 65535) {
        rv = nghttp2_session_set_local_window_size(self->session, NGHTTP2_FLAG_NONE, 0,
                                                   (int32_t)connection_window);
    }
    if (rv != 0) {
        PyErr_Format(Ng2Error, "settings: %s", nghttp2_strerror(rv));
        return -1;
    }
    return 0;
}

static int track_frames(Session *self, const unsigned char *data, size_t size) {
    size_t pos = 0;
    while (pos < size) {
        if (self->skip) {
            size_t take = self->skip < size - pos ? self->skip : size - pos;
            self->skip -= take;
            pos += take;
            continue;
        }
        while (self->fhead_len < 9 && pos < size) {
            self->fhead[self->fhead_len++] = data[pos++];
        }
        if (self->fhead_len < 9) {
            return 0;
        }
        self->fhead_len = 0;
        const unsigned char *h = self->fhead;
        self->skip = ((size_t)h[0] << 16) | ((size_t)h[1] << 8) | h[2];
        unsigned char kind = h[3], flags = h[4];
        if (kind == NGHTTP2_HEADERS || kind == NGHTTP2_PUSH_PROMISE || kind == NGHTTP2_CONTINUATION) {
            self->in_block = !(flags & NGHTTP2_FLAG_END_HEADERS);
        } else if (kind > NGHTTP2_CONTINUATION) {
            /* unknown or extension frames: nghttp2 skips them without a callback */
            Py_INCREF(control_event);
            if (emit(self, control_event) < 0) {
                return -1;
            }
        }
    }
    return 0;
}

static PyObject *take_events(Session *self) {
    if (PyList_GET_SIZE(self->events) == 0) {
        Py_RETURN_NONE;
    }
    PyObject *events = self->events;
    self->events = PyList_New(0);
    if (self->events == NULL) {
        self->events = events;
        return NULL;
    }
    return events;
}

PyDoc_STRVAR(receive_doc, "receive(data) -> events or None\n\n"
             "Feed bytes from the client. Raises Error (with .code, an nghttp2 error) when the "
             "connection cannot go on; whatever nghttp2 queued (a GOAWAY) is still in send().");

static PyObject *Session_receive(Session *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    self->failed = 0;
    if (track_frames(self, view.buf, (size_t)view.len) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    ssize_t rv = nghttp2_session_mem_recv(self->session, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (self->failed && PyErr_Occurred()) {
        return NULL;
    }
    if (rv < 0) {
        PyObject *value = Py_BuildValue("(si)", nghttp2_strerror((int)rv), (int)rv);
        if (value != NULL) {
            PyErr_SetObject(Ng2Error, value);
            Py_DECREF(value);
        }
        return NULL;
    }
    return take_events(self);
}

static PyObject *Session_events(Session *self, PyObject *unused) {
    (void)unused;
    return take_events(self);
}

PyDoc_STRVAR(send_doc, "send(limit) -> bytes\n\nThe bytes for the client (about `limit` at most: "
             "frames are whole), b'' when there is nothing to send.");

static PyObject *Session_send(Session *self, PyObject *arg) {
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    self->out_len = 0;
    self->failed = 0;
    while ((Py_ssize_t)self->out_len < limit) {
        const uint8_t *chunk;
        ssize_t n = nghttp2_session_mem_send(self->session, &chunk);
        if (n < 0) {
            if (self->failed && PyErr_Occurred()) {
                return NULL;
            }
            PyErr_Format(Ng2Error, "nghttp2_session_mem_send: %s", nghttp2_strerror((int)n));
            return NULL;
        }
        if (n == 0) {
            break;
        }
        if (self->out_len + (size_t)n > self->out_cap) {
            size_t cap = self->out_cap ? self->out_cap : 16384;
            while (cap < self->out_len + (size_t)n) {
                cap *= 2;
            }
            char *out = PyMem_Realloc(self->out, cap);
            if (out == NULL) {
                return PyErr_NoMemory();
            }
            self->out = out;
            self->out_cap = cap;
        }
        memcpy(self->out + self->out_len, chunk, (size_t)n);
        self->out_len += (size_t)n;
    }
    if (self->failed && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize(self->out, (Py_ssize_t)self->out_len);
    if (self->out_cap > 1024 * 1024) { /* do not keep a large buffer for an idle connection */
        PyMem_Free(self->out);
        self->out = NULL;
        self->out_cap = 0;
    }
    return result;
}

PyDoc_STRVAR(respond_doc, "respond(stream_id, headers, body) -> bool\n\n"
             "Submit the response head ([(name, value)] of bytes, ':status' first). With body "
             "False the HEADERS frame ends the stream; else the body follows with write(). "
             "False when the stream is gone.");

static PyObject *Session_respond(Session *self, PyObject *args) {
    int sid, body;
    PyObject *headers;
    if (!PyArg_ParseTuple(args, "iO!p", &sid, &PyList_Type, &headers, &body)) {
        return NULL;
    }
    nghttp2_stream *stream = nghttp2_session_find_stream(self->session, sid);
    if (stream == NULL || nghttp2_stream_get_state(stream) == NGHTTP2_STREAM_STATE_CLOSED
        || nghttp2_session_get_stream_user_data(self->session, sid) != NULL) {
        Py_RETURN_FALSE;
    }
    Py_ssize_t count = PyList_GET_SIZE(headers);
    nghttp2_nv small[32];
    nghttp2_nv *nva = count <= 32 ? small : PyMem_Malloc((size_t)count * sizeof(nghttp2_nv));
    if (nva == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            if (nva != small) {
                PyMem_Free(nva);
            }
            PyErr_SetString(PyExc_TypeError, "headers must be (bytes, bytes) pairs");
            return NULL;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        nva[i].name = (uint8_t *)PyBytes_AS_STRING(name);
        nva[i].namelen = (size_t)PyBytes_GET_SIZE(name);
        nva[i].value = (uint8_t *)PyBytes_AS_STRING(value);
        nva[i].valuelen = (size_t)PyBytes_GET_SIZE(value);
        nva[i].flags = NGHTTP2_NV_FLAG_NONE; /* nghttp2 copies them */
    }
    outbuf *ob = NULL;
    nghttp2_data_provider provider;
    if (body) {
        ob = PyMem_Calloc(1, sizeof(outbuf));
        if (ob == NULL) {
            if (nva != small) {
                PyMem_Free(nva);
            }
            return PyErr_NoMemory();
        }
        ob->stream_id = sid;
        ob->next = self->buffers;
        if (self->buffers) {
            self->buffers->prev = ob;
        }
        self->buffers = ob;
        provider.source.ptr = ob;
        provider.read_callback = read_body;
        nghttp2_session_set_stream_user_data(self->session, sid, ob);
    }
    int rv = nghttp2_submit_response(self->session, sid, nva, (size_t)count, body ? &provider : NULL);
    if (nva != small) {
        PyMem_Free(nva);
    }
    if (rv != 0) {
        if (ob != NULL) {
            nghttp2_session_set_stream_user_data(self->session, sid, NULL);
            outbuf_free(self, ob);
        }
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(write_doc, "write(stream_id, pieces, end) -> int\n\n"
             "Queue body pieces (a list of bytes) of a response submitted with body=True; end "
             "finishes the stream after them. Returns the bytes now waiting, -1 when the stream "
             "is gone.");

static PyObject *Session_write(Session *self, PyObject *args) {
    int sid, end;
    PyObject *pieces;
    if (!PyArg_ParseTuple(args, "iO!p", &sid, &PyList_Type, &pieces, &end)) {
        return NULL;
    }
    outbuf *ob = nghttp2_session_get_stream_user_data(self->session, sid);
    if (ob == NULL || ob->eof) {
        return PyLong_FromLong(-1);
    }
    Py_ssize_t count = PyList_GET_SIZE(pieces);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *piece = PyList_GET_ITEM(pieces, i);
        if (!PyBytes_Check(piece)) {
            PyErr_SetString(PyExc_TypeError, "body pieces must be bytes");
            return NULL;
        }
        if (PyBytes_GET_SIZE(piece) && outbuf_push(ob, piece) < 0) {
            return NULL;
        }
    }
    if (end) {
        ob->eof = 1;
    }
    if (count || end) {
        nghttp2_session_resume_data(self->session, sid);
    }
    return PyLong_FromSsize_t(ob->pending);
}

static PyObject *Session_pending(Session *self, PyObject *arg) {
    long sid = PyLong_AsLong(arg);
    if (sid == -1 && PyErr_Occurred()) {
        return NULL;
    }
    outbuf *ob = nghttp2_session_get_stream_user_data(self->session, (int32_t)sid);
    return PyLong_FromSsize_t(ob == NULL ? -1 : ob->pending);
}

PyDoc_STRVAR(consume_doc, "consume(stream_id, size)\n\nThe application took `size` bytes of "
             "the stream's DATA: its windows may open again (WINDOW_UPDATE).");

static PyObject *Session_consume(Session *self, PyObject *args) {
    int sid;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in", &sid, &size)) {
        return NULL;
    }
    if (size > 0) {
        if (nghttp2_session_consume(self->session, sid, (size_t)size) != 0) {
            nghttp2_session_consume_connection(self->session, (size_t)size);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *Session_reset(Session *self, PyObject *args) {
    int sid;
    unsigned int code;
    if (!PyArg_ParseTuple(args, "iI", &sid, &code)) {
        return NULL;
    }
    nghttp2_submit_rst_stream(self->session, NGHTTP2_FLAG_NONE, sid, code);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(goaway_doc, "goaway(code, terminate)\n\nGOAWAY with the last stream seen. With "
             "terminate, the connection ends once it is sent (want_write() turns False); "
             "else open streams go on (a graceful stop).");

static PyObject *Session_goaway(Session *self, PyObject *args) {
    unsigned int code;
    int terminate;
    if (!PyArg_ParseTuple(args, "Ip", &code, &terminate)) {
        return NULL;
    }
    if (terminate) {
        nghttp2_session_terminate_session(self->session, code);
    } else {
        nghttp2_submit_goaway(self->session, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(self->session), code, NULL, 0);
    }
    Py_RETURN_NONE;
}

static PyObject *Session_want_write(Session *self, PyObject *unused) {
    (void)unused;
    return PyBool_FromLong(nghttp2_session_want_write(self->session));
}

static PyObject *Session_want_read(Session *self, PyObject *unused) {
    (void)unused;
    return PyBool_FromLong(nghttp2_session_want_read(self->session));
}

static PyObject *Session_get_incomplete(Session *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->skip > 0 || self->fhead_len > 0 || self->in_block);
}

static PyObject *Session_get_last_stream_id(Session *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(nghttp2_session_get_last_proc_stream_id(self->session));
}

static PyMethodDef Session_methods[] = {
    {"receive", (PyCFunction)Session_receive, METH_O, receive_doc},
    {"events", (PyCFunction)Session_events, METH_NOARGS, "Events from send() (streams closed), or None."},
    {"send", (PyCFunction)Session_send, METH_O, send_doc},
    {"respond", (PyCFunction)Session_respond, METH_VARARGS, respond_doc},
    {"write", (PyCFunction)Session_write, METH_VARARGS, write_doc},
    {"pending", (PyCFunction)Session_pending, METH_O, "Body bytes of a stream not yet sent (-1: gone)."},
    {"consume", (PyCFunction)Session_consume, METH_VARARGS, consume_doc},
    {"reset", (PyCFunction)Session_reset, METH_VARARGS, "reset(stream_id, code): RST_STREAM."},
    {"goaway", (PyCFunction)Session_goaway, METH_VARARGS, goaway_doc},
    {"want_write", (PyCFunction)Session_want_write, METH_NOARGS, "nghttp2 has frames to send."},
    {"want_read", (PyCFunction)Session_want_read, METH_NOARGS, "nghttp2 reads on (no GOAWAY ended it)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Session_getset[] = {
    {"incomplete", (getter)Session_get_incomplete, NULL,
     "The bytes so far end inside a frame or a header block.", NULL},
    {"last_stream_id", (getter)Session_get_last_stream_id, NULL, "The highest stream id handled.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "bastion.proxy.edge._ng2.Session",
    .tp_doc = "The server side of one HTTP/2 connection (libnghttp2).",
    .tp_basicsize = sizeof(Session),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Session_init,
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
};

static struct PyModuleDef ng2module = {
    PyModuleDef_HEAD_INIT, "_ng2", "HTTP/2 server sessions on libnghttp2 (see _ng2.c).", -1, NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ng2(void) {
    if (PyType_Ready(&SessionType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&ng2module);
    if (m == NULL) {
        return NULL;
    }
    Ng2Error = PyErr_NewExceptionWithDoc("bastion.proxy.edge._ng2.Error",
                                         "The HTTP/2 connection cannot go on (args: message, nghttp2 code).",
                                         NULL, NULL);
    control_event = Py_BuildValue("(ii)", EV_CONTROL, 0);
    if (Ng2Error == NULL || control_event == NULL) {
        return NULL;
    }
    Py_INCREF(&SessionType);
    PyModule_AddObject(m, "Session", (PyObject *)&SessionType);
    PyModule_AddObject(m, "Error", Ng2Error);
    PyModule_AddStringConstant(m, "NGHTTP2_VERSION", nghttp2_version(0)->version_str);
    PyModule_AddIntConstant(m, "EV_REQUEST", EV_REQUEST);
    PyModule_AddIntConstant(m, "EV_DATA", EV_DATA);
    PyModule_AddIntConstant(m, "EV_END", EV_END);
    PyModule_AddIntConstant(m, "EV_RESET", EV_RESET);
    PyModule_AddIntConstant(m, "EV_RESET_SENT", EV_RESET_SENT);
    PyModule_AddIntConstant(m, "EV_CLOSED", EV_CLOSED);
    PyModule_AddIntConstant(m, "EV_CONTROL", EV_CONTROL);
    PyModule_AddIntConstant(m, "EV_EMPTY_DATA", EV_EMPTY_DATA);
    PyModule_AddIntConstant(m, "EV_GOAWAY", EV_GOAWAY);
    PyModule_AddIntConstant(m, "ERR_FLOODED", NGHTTP2_ERR_FLOODED);
    PyModule_AddIntConstant(m, "ERR_BAD_CLIENT_MAGIC", NGHTTP2_ERR_BAD_CLIENT_MAGIC);
    return m;
}
