// A plain C ABI over PyTorch's c10d (TCPStore rendezvous, Gloo process
// group), for src/dist. Every function catches what c10d throws and returns
// it as text in `err`; none of them throws into Rust.
//
// Tensors cross as `at::Tensor*`, which is what tch's `C_tensor` points to.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

using std::chrono::milliseconds;

// Writes the message of the exception in flight into err (NUL-terminated).
void report(char* err, size_t len) {
  std::string msg;
  try {
    throw;
  } catch (const c10::Error& e) {
    msg = e.what_without_backtrace();
  } catch (const std::exception& e) {
    msg = e.what();
  } catch (...) {
    msg = "unknown C++ exception";
  }
  if (len == 0) return;
  size_t n = std::min(msg.size(), len - 1);
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

std::vector<at::Tensor> tensors(at::Tensor** ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}

// Runs a collective to completion; the backend's timeout bounds the wait.
int finish(const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
  return 0;
}

} // namespace

struct TarpoStore {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

struct TarpoPg {
  c10::intrusive_ptr<c10d::Backend> backend;
};

extern "C" {

// The rendezvous store: rank 0 serves it on `port` (or on `listen_fd`, a
// socket already listening there), every rank connects to host:port,
// retrying until `timeout_ms`.
TarpoStore* tarpo_store_new(
    const char* host, uint16_t port, bool server, int listen_fd,
    int64_t timeout_ms, char* err, size_t len) {
  try {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = server;
    if (listen_fd >= 0) {
      o.masterListenFd = listen_fd;
    }
    o.waitWorkers = false;
    o.timeout = milliseconds(timeout_ms);
    auto s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    return new TarpoStore{s};
  } catch (...) {
    report(err, len);
    return nullptr;
  }
}

void tarpo_store_free(TarpoStore* s) { delete s; }

// store.add(key, delta): the counter after adding (delta 0 reads it).
int tarpo_store_add(
    TarpoStore* s, const char* key, int64_t delta, int64_t* out, char* err,
    size_t len) {
  try {
    *out = s->store->add(key, delta);
    return 0;
  } catch (...) {
    report(err, len);
    return -1;
  }
}

// The Gloo process group over the store; collectives time out after
// `timeout_ms`.
TarpoPg* tarpo_pg_gloo(
    TarpoStore* s, const char* hostname, int rank, int size, int64_t timeout_ms,
    char* err, size_t len) {
  try {
    auto o = c10d::ProcessGroupGloo::Options::create(milliseconds(timeout_ms));
    // An empty hostname: the address this machine's hostname resolves to
    // (loopback when it does not resolve), as torch.distributed does.
    o->devices.push_back(
        *hostname ? c10d::ProcessGroupGloo::createDeviceForHostname(hostname)
                  : c10d::ProcessGroupGloo::createDefaultDevice());
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        s->store, rank, size, o);
    return new TarpoPg{pg};
  } catch (...) {
    report(err, len);
    return nullptr;
  }
}

void tarpo_pg_free(TarpoPg* pg) { delete pg; }

// op: 0 sum, 1 max, 2 min. In place.
int tarpo_pg_allreduce(
    TarpoPg* pg, at::Tensor** ts, size_t n, int op, char* err, size_t len) {
  try {
    auto v = tensors(ts, n);
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX
        : op == 2        ? c10d::ReduceOp::MIN
                         : c10d::ReduceOp::SUM;
    return finish(pg->backend->allreduce(v, o));
  } catch (...) {
    report(err, len);
    return -1;
  }
}

// In place: every rank's tensor becomes root's.
int tarpo_pg_broadcast(
    TarpoPg* pg, at::Tensor* t, int root, char* err, size_t len) {
  try {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    return finish(pg->backend->broadcast(v, o));
  } catch (...) {
    report(err, len);
    return -1;
  }
}

// outs[r] (one per rank, each shaped like input) receives rank r's input.
int tarpo_pg_allgather(
    TarpoPg* pg, at::Tensor* input, at::Tensor** outs, size_t n, char* err,
    size_t len) {
  try {
    std::vector<at::Tensor> in{*input};
    std::vector<std::vector<at::Tensor>> out{tensors(outs, n)};
    return finish(pg->backend->allgather(out, in));
  } catch (...) {
    report(err, len);
    return -1;
  }
}

int tarpo_pg_barrier(TarpoPg* pg, char* err, size_t len) {
  try {
    return finish(pg->backend->barrier());
  } catch (...) {
    report(err, len);
    return -1;
  }
}

} // extern "C"
