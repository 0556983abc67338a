// The NCCL process group, for jobs on CUDA devices. Built by build.rs when
// the venv's torch has CUDA and the NCCL and CUDA headers are installed
// (requirements.txt: nvidia-nccl, nvidia-cuda-crt); same error contract as
// c10d_shim.cpp: nothing throws into Rust.
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>

// As in c10d_shim.cpp.
struct TarpoStore {
  c10::intrusive_ptr<c10d::TCPStore> store;
};
struct TarpoPg {
  c10::intrusive_ptr<c10d::Backend> backend;
};

extern "C" TarpoPg* tarpo_pg_nccl(
    TarpoStore* s, int rank, int size, int64_t timeout_ms, char* err,
    size_t len) {
  try {
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        s->store, rank, size, o);
    return new TarpoPg{pg};
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (len > 0) {
      size_t n = std::min(msg.size(), len - 1);
      std::memcpy(err, msg.data(), n);
      err[n] = '\0';
    }
    return nullptr;
  }
}
