// Declarations only (see README.md): ProcessGroupGloo.hpp's inline
// setTimeout names Context::setTimeout, which the shim never calls.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
