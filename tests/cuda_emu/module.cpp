// The emulator's controls as Python sees them (pyengine_cuda_emu, built by lane.py). The operators
// themselves are torch.ops.pyengine_emu.* (the CUDA glue registers them); these set how the next
// launches run and report what happened.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <stdexcept>
#include <string>

#include "emu.h"

namespace py = pybind11;

namespace {

pe_emu::Order parse_order(const std::string& order) {
  if (order == "in_order") return pe_emu::Order::InOrder;
  if (order == "reversed") return pe_emu::Order::Reversed;
  if (order == "shuffled") return pe_emu::Order::Shuffled;
  throw std::invalid_argument("set_schedule: expected order 'in_order', 'reversed' or "
                              "'shuffled', but got '" + order + "'");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "controls of the CUDA emulator that runs pyengine's CUDA kernels on the host";
  m.def(
      "set_schedule",
      [](const std::string& order, uint64_t seed) { pe_emu::set_schedule(parse_order(order), seed); },
      py::arg("order"), py::arg("seed") = 0,
      "The order in which runnable threads resume and blocks run: 'in_order', 'reversed' or "
      "'shuffled' (by seed).");
  m.def("set_cap", &pe_emu::set_cap, py::arg("name"), py::arg("value"),
        "Shrinks (or sets) a launch cap of csrc/cuda (PE_LAUNCH_CAP) by name.");
  m.def("reset_caps", &pe_emu::reset_caps, "Every launch cap back to its CUDA-build value.");
  m.def("caps", &pe_emu::caps, "{name: current value} of every launch cap.");
  m.def("reset_device", &pe_emu::reset_device,
        "Clears the sticky error a device assert or a deadlock left (a fresh CUDA context).");
  m.def("last_error_message", &pe_emu::last_error_message,
        "What the emulator detected at the last failed launch ('' if none).");
  m.def("sticky_error", []() { return static_cast<int>(pe_emu::sticky_error()); },
        "The sticky error code (0: none).");
  m.def(
      "stats",
      []() {
        const pe_emu::Stats s = pe_emu::stats();
        return std::map<std::string, int64_t>{{"launches", s.launches},
                                              {"blocks", s.blocks},
                                              {"threads", s.threads},
                                              {"shared_bytes_peak", s.shared_bytes_peak}};
      },
      "{launches, blocks, threads, shared_bytes_peak} since reset_stats().");
  m.def("launch_sites", &pe_emu::launch_sites,
        "{'<file>:<kernel>': grids launched} per launch site since reset_stats().");
  m.def("reset_stats", &pe_emu::reset_stats);
}
