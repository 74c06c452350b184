// lowvram C++17 wrapper: header-only, move-only RAII owners over the C handles, errors as exceptions.
// Include "lowvram.h" (include/) on the include path. `capi()` gives the raw handle for calls not wrapped here.
#ifndef LOWVRAM_HPP
#define LOWVRAM_HPP

#include "lowvram.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

namespace lowvram {

/// A failed call: the status and the library's message for it.
class Error : public std::runtime_error {
public:
    Error(lowvram_status status, const std::string &message)
        : std::runtime_error(std::string(lowvram_status_name(status)) + ": " + message), status_(status) {}
    lowvram_status status() const noexcept { return status_; }

private:
    lowvram_status status_;
};

/// Throw `Error` unless `status` is OK.
inline void check(lowvram_status status) {
    if (status != LOWVRAM_STATUS_OK) throw Error(status, lowvram_last_error_message());
}

/// Library version string.
inline std::string version() { return lowvram_version(); }

/// Host RAM and CUDA devices.
inline lowvram_system_info system_stats() {
    lowvram_system_info info{};
    info.struct_size = sizeof info;
    check(lowvram_system_stats(&info));
    return info;
}

namespace detail {
/// A move-only owner of a C handle that calls `Free` when it goes.
template <typename T, void (*Free)(T *)>
class Owner {
public:
    Owner() noexcept = default;
    explicit Owner(T *raw) noexcept : raw_(raw) {}
    Owner(const Owner &) = delete;
    Owner &operator=(const Owner &) = delete;
    Owner(Owner &&other) noexcept : raw_(std::exchange(other.raw_, nullptr)) {}
    Owner &operator=(Owner &&other) noexcept {
        if (this != &other) reset(std::exchange(other.raw_, nullptr));
        return *this;
    }
    ~Owner() { reset(); }
    void reset(T *raw = nullptr) noexcept {
        if (raw_) Free(raw_);
        raw_ = raw;
    }
    T *capi() const noexcept { return raw_; }
    explicit operator bool() const noexcept { return raw_ != nullptr; }

private:
    T *raw_ = nullptr;
};
}  // namespace detail

/// Log callback as a C++ function; it runs on the thread making the lowvram call.
using LogFn = std::function<void(lowvram_log_level, const char *)>;

/// Options for `Context`.
struct ContextOptions {
    std::string device;       ///< "" = from configuration ("auto")
    std::string config_yaml;  ///< "" = none
    std::string config_path;  ///< "" = none
};

/// A model cache with its budgets. Move-only; thread-safe like the C context.
class Context {
public:
    explicit Context(const ContextOptions &options = {}, LogFn log = nullptr)
        : log_(log ? std::make_unique<LogFn>(std::move(log)) : nullptr) {
        lowvram_context_params p;
        check(lowvram_context_params_init(&p, sizeof p));
        if (!options.device.empty()) p.device = options.device.c_str();
        if (!options.config_yaml.empty()) p.config_yaml = options.config_yaml.c_str();
        if (!options.config_path.empty()) p.config_path = options.config_path.c_str();
        if (log_) {
            p.log_callback = &Context::trampoline;
            p.log_user_data = log_.get();
        }
        lowvram_context *raw = nullptr;
        check(lowvram_context_new(&p, &raw));
        handle_.reset(raw);
    }

    /// Stop the call running on this context at its next step (call from another thread).
    void cancel() const { check(lowvram_context_cancel(handle_.capi())); }

    lowvram_context *capi() const noexcept { return handle_.capi(); }

private:
    static void trampoline(lowvram_log_level level, const char *message, void *user_data) {
        auto *fn = static_cast<LogFn *>(user_data);
        try {
            (*fn)(level, message);
        } catch (...) {
            // exceptions must not cross into C
        }
    }

    // Declared before handle_ so it outlives the context that calls it.
    std::unique_ptr<LogFn> log_;
    detail::Owner<lowvram_context, lowvram_context_free> handle_;
};

}  // namespace lowvram

#endif  // LOWVRAM_HPP
