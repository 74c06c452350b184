// lowvram C++17 wrapper: header-only, move-only RAII owners over the C handles, errors as exceptions.
// Include "lowvram.h" (include/) on the include path. `capi()` gives the raw handle for calls not wrapped here.
//
//   lowvram::Context ctx({"emulated:512MiB"});
//   lowvram::Model unet = ctx.load_model("models/tiny-sd/unet"), vae = ctx.load_model("models/tiny-sd/vae");
//   lowvram::DenoiseOptions o;  o.steps = 8;  o.progress = [](uint32_t step, uint32_t total) { return true; };
//   lowvram::Tensor latents = ctx.denoise(unet, o, cond, &uncond);
//   ctx.vae_decode(vae, latents).write_png("out.png");
//
// From a prompt, through a pipeline folder (tokenizer, text encoders, denoiser, VAE):
//   lowvram::Pipeline sd = ctx.load_pipeline({"models/tiny-sd"});
//   lowvram::Conditioning cond = ctx.encode_prompt(sd, "a red circle on a blue background");
//   ctx.decode(sd, ctx.denoise(sd, cond, o)).write_png("out.png");
//
// Ownership: every class owns exactly one C handle and frees it in its destructor; copies are deleted, moves leave
// the source empty (`capi() == nullptr`). A Model, Pipeline or Reservation may outlive the Context it came from (the
// C API allows it). Callbacks (log, progress) never let an exception cross into C: a throwing progress callback cancels
// the run and its exception is rethrown from `denoise`; a throwing log callback's exception is dropped.
#ifndef LOWVRAM_HPP
#define LOWVRAM_HPP

#include "lowvram.h"

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lowvram {

/// A failed call: the status and the library's message for it. `what()` is "STATUS_NAME: message".
class Error : public std::runtime_error {
public:
    Error(lowvram_status status, const std::string &message)
        : std::runtime_error(std::string(lowvram_status_name(status)) + ": " + message),
          status_(status),
          message_(message) {}
    lowvram_status status() const noexcept { return status_; }
    /// The library's message alone (without the status name).
    const std::string &message() const noexcept { return message_; }

private:
    lowvram_status status_;
    std::string message_;
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
    T *get() const noexcept { return raw_; }
    explicit operator bool() const noexcept { return raw_ != nullptr; }

private:
    T *raw_ = nullptr;
};

/// The dtype a C++ element type stands for: float = F32, uint16_t = F16 bits (BF16 when asked explicitly).
template <typename T>
struct dtype_of;
template <>
struct dtype_of<float> {
    static constexpr lowvram_dtype value = LOWVRAM_DTYPE_F32;
};
template <>
struct dtype_of<std::uint16_t> {
    static constexpr lowvram_dtype value = LOWVRAM_DTYPE_F16;
};

inline std::size_t element_size(lowvram_dtype dtype) { return dtype == LOWVRAM_DTYPE_F32 ? 4 : 2; }
}  // namespace detail

/// What `Tensor::info` reports.
struct TensorInfo {
    lowvram_dtype dtype;
    std::vector<std::int64_t> shape;
    std::size_t byte_len;
};

/// A host tensor owned by the library (contiguous, row-major, immutable). Move-only.
class Tensor {
public:
    Tensor() noexcept = default;
    /// Take ownership of a handle the C API returned.
    explicit Tensor(lowvram_tensor *raw) noexcept : handle_(raw) {}

    /// Copy `count` elements at `data` into a new tensor of `shape`. `T` is float (F32) or std::uint16_t (F16 bits,
    /// or BF16 bits with `dtype = LOWVRAM_DTYPE_BF16`).
    template <typename T>
    static Tensor from_host(const std::vector<std::int64_t> &shape, const T *data, std::size_t count,
                            lowvram_dtype dtype = detail::dtype_of<T>::value) {
        static_assert(std::is_same<T, float>::value || std::is_same<T, std::uint16_t>::value,
                      "lowvram tensors hold float (F32) or std::uint16_t (F16/BF16 bits)");
        if (detail::element_size(dtype) != sizeof(T))
            throw Error(LOWVRAM_STATUS_INVALID_ARGUMENT, "dtype does not match the element type's size");
        lowvram_tensor *raw = nullptr;
        check(lowvram_tensor_from_host(dtype, shape.data(), shape.size(), data, count * sizeof(T), &raw));
        return Tensor(raw);
    }
    template <typename T>
    static Tensor from_host(const std::vector<std::int64_t> &shape, const std::vector<T> &data,
                            lowvram_dtype dtype = detail::dtype_of<T>::value) {
        return from_host<T>(shape, data.data(), data.size(), dtype);
    }

    TensorInfo info() const {
        TensorInfo out{LOWVRAM_DTYPE_F32, std::vector<std::int64_t>(LOWVRAM_MAX_DIMS), 0};
        std::size_t ndim = 0;
        check(lowvram_tensor_info(handle_.get(), &out.dtype, out.shape.data(), out.shape.size(), &ndim, &out.byte_len));
        out.shape.resize(ndim);
        return out;
    }
    std::vector<std::int64_t> shape() const { return info().shape; }
    lowvram_dtype dtype() const { return info().dtype; }

    /// Copy the data out. `T` must match the dtype: float for F32, std::uint16_t for F16 or BF16 (raw bits).
    template <typename T>
    std::vector<T> read() const {
        static_assert(std::is_same<T, float>::value || std::is_same<T, std::uint16_t>::value,
                      "read<float>() or read<std::uint16_t>()");
        TensorInfo i = info();
        if (detail::element_size(i.dtype) != sizeof(T))
            throw Error(LOWVRAM_STATUS_INVALID_ARGUMENT,
                        std::string("tensor dtype is ") + (i.dtype == LOWVRAM_DTYPE_F32 ? "f32" : "16-bit") +
                            ", read it as " + (i.dtype == LOWVRAM_DTYPE_F32 ? "float" : "std::uint16_t"));
        std::vector<T> out(i.byte_len / sizeof(T));
        check(lowvram_tensor_read(handle_.get(), out.data(), i.byte_len));
        return out;
    }

    /// Write a decoded image `[B, 3, H, W]` (values in [-1, 1]) as 8-bit RGB PNG (a batch: NAME-0.png, ...).
    void write_png(const std::string &path) const { check(lowvram_tensor_write_png(handle_.get(), path.c_str())); }

    lowvram_tensor *capi() const noexcept { return handle_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    detail::Owner<lowvram_tensor, lowvram_tensor_free> handle_;
};

/// A loaded model component (UNet or VAE). Move-only; may outlive its Context.
class Model {
public:
    Model() noexcept = default;
    explicit Model(lowvram_model *raw) noexcept : handle_(raw) {}

    /// Kind, sizes and residency now (`struct_size` is set by the library).
    lowvram_model_info info() const {
        lowvram_model_info i{};
        i.struct_size = sizeof i;
        check(lowvram_model_get_info(handle_.get(), &i));
        return i;
    }

    lowvram_model *capi() const noexcept { return handle_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    detail::Owner<lowvram_model, lowvram_model_free> handle_;
};

/// Device memory reserved for the host; destroying it gives the bytes back. Move-only; may outlive its Context.
class Reservation {
public:
    Reservation() noexcept = default;
    explicit Reservation(lowvram_reservation *raw) noexcept : handle_(raw) {}

    std::uint64_t bytes() const {
        std::uint64_t b = 0;
        check(lowvram_reservation_bytes(handle_.get(), &b));
        return b;
    }

    lowvram_reservation *capi() const noexcept { return handle_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    detail::Owner<lowvram_reservation, lowvram_reservation_free> handle_;
};

/// Named conditioning tensors (`sampling.cond_embeddings`, `sampling.uncond_embeddings`, `sampling.cond_pooled`,
/// ...; the CLI's `--inputs` names): what `Context::encode_prompt` returns, or built by the host. Move-only, one
/// owner; reading is thread-safe, `set` must not race other calls on the same conditioning.
class Conditioning {
public:
    /// An empty conditioning, for host-given tensors.
    Conditioning() {
        lowvram_conditioning *raw = nullptr;
        check(lowvram_conditioning_new(&raw));
        handle_.reset(raw);
    }
    /// Take ownership of a handle the C API returned.
    explicit Conditioning(lowvram_conditioning *raw) noexcept : handle_(raw) {}

    /// Set tensor `name` to a copy of `tensor` (the caller keeps `tensor`).
    void set(const std::string &name, const Tensor &tensor) {
        check(lowvram_conditioning_set(handle_.get(), name.c_str(), tensor.capi()));
    }
    /// A copy of tensor `name` (Error INVALID_ARGUMENT when there is none).
    Tensor get(const std::string &name) const {
        lowvram_tensor *raw = nullptr;
        check(lowvram_conditioning_get(handle_.get(), name.c_str(), &raw));
        return Tensor(raw);
    }

    lowvram_conditioning *capi() const noexcept { return handle_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    detail::Owner<lowvram_conditioning, lowvram_conditioning_free> handle_;
};

/// Where a pipeline's components are (`lowvram_pipeline_params`): `Context::load_pipeline({"models/tiny-sd"})`.
struct PipelineOptions {
    PipelineOptions(std::string path_ = {}) : path(std::move(path_)) {}
    std::string path;                 ///< a diffusers pipeline folder or a single-file checkpoint; required
    std::string vae_path;             ///< "" = the pipeline's vae/
    std::string text_encoder_path;    ///< "" = the pipeline's text_encoder/
    std::string text_encoder_2_path;  ///< "" = the pipeline's text_encoder_2/
};

/// How `Context::encode_prompt` encodes (`lowvram_prompt_params`); the defaults are the library's.
struct PromptOptions {
    std::optional<std::string> negative_prompt;  ///< what not to draw; none = no negative (SDXL: zeros)
    std::uint32_t batch = 1;                     ///< images per prompt
    std::uint32_t width = 512;                   ///< image size in pixels (SDXL's size conditioning)
    std::uint32_t height = 512;
    std::uint32_t clip_skip = 0;                 ///< layers to skip from the end of the text encoder
};

/// A loaded pipeline: its family's tokenizers, text encoders, denoiser and VAE, each in the cache like any model.
/// Move-only here (shared in C: each call holds its own reference); may outlive its Context.
class Pipeline {
public:
    Pipeline() noexcept = default;
    explicit Pipeline(lowvram_pipeline *raw) noexcept : handle_(raw) {}

    lowvram_pipeline *capi() const noexcept { return handle_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    detail::Owner<lowvram_pipeline, lowvram_pipeline_free> handle_;
};

/// Progress of a run: `step` of `total` done; return false to cancel (the call then throws Error CANCELLED).
using ProgressFn = std::function<bool(std::uint32_t step, std::uint32_t total)>;

/// A cancel request for the calls it is given to (`DenoiseOptions::cancel`, `DecodeOptions::cancel`,
/// `Context::load_model`): sticky, so cancelling before a call starts still stops it, and it never stops another
/// call. Shared in C (each call holds its own reference); move-only here. Thread-safe: `cancel()` from any thread.
class CancelToken {
public:
    CancelToken() {
        lowvram_cancel_token *raw = nullptr;
        check(lowvram_cancel_token_new(&raw));
        handle_.reset(raw);
    }
    void cancel() const { check(lowvram_cancel_token_cancel(handle_.get())); }
    bool cancelled() const {
        bool c = false;
        check(lowvram_cancel_token_is_cancelled(handle_.get(), &c));
        return c;
    }
    lowvram_cancel_token *capi() const noexcept { return handle_.get(); }

private:
    detail::Owner<lowvram_cancel_token, lowvram_cancel_token_free> handle_;
};

/// Options of `Context::denoise`; the defaults are the library's (`lowvram_denoise_params_init`).
struct DenoiseOptions {
    lowvram_scheduler scheduler = LOWVRAM_SCHEDULER_EULER;
    bool karras = false;
    std::uint32_t steps = 20;
    float guidance = 7.5f;           ///< ≤ 1 runs the conditional batch only
    std::uint64_t seed = 0;          ///< initial noise when none is given, and Euler ancestral's step noise
    std::uint32_t latent_width = 64; ///< used when no init noise is given (image size / 8)
    std::uint32_t latent_height = 64;
    const Tensor *step_noise = nullptr; ///< [steps, B, 4, h, w] for Euler ancestral; borrowed for the call
    ProgressFn progress;                ///< called after each step on the calling thread; empty = none
    const CancelToken *cancel = nullptr; ///< cancels this call only (also before it starts); borrowed
};

/// Options of `Context::vae_decode`; the defaults are the library's.
struct DecodeOptions {
    std::uint32_t tile_latent = 0;    ///< 0 = automatic; > 0 = always tile with this edge (latent pixels)
    std::uint32_t overlap_latent = 0; ///< ignored: tiled decoding is exact and needs no overlap
    bool never_tile = false;          ///< BUDGET_TOO_SMALL rather than tiling
    ProgressFn progress;              ///< (blocks done, blocks) as each decoder block starts; empty = none
    const CancelToken *cancel = nullptr; ///< cancels this call only (also before it starts); borrowed
};

/// How long `Context::reserve` waits (`lowvram_reservation_params`); the defaults are the library's.
struct ReservationOptions {
    std::uint64_t timeout_ms = LOWVRAM_WAIT_FOREVER;  ///< 0 = only if free now; Error TIMEOUT when it runs out
    const CancelToken *cancel = nullptr;              ///< ends the wait with Error CANCELLED; borrowed
};

/// Log callback as a C++ function; it runs on the thread making the lowvram call.
using LogFn = std::function<void(lowvram_log_level, const char *)>;

/// Options for `Context`: `Context ctx({"emulated:512MiB", "max_cache_vram_gb: 2\n"});`
struct ContextOptions {
    ContextOptions(std::string device_ = {}, std::string config_yaml_ = {}, std::string config_path_ = {})
        : device(std::move(device_)), config_yaml(std::move(config_yaml_)), config_path(std::move(config_path_)) {}
    std::string device;       ///< "" = from configuration ("auto"); "cpu", "cuda:N", "emulated:SIZE"
    std::string config_yaml;  ///< "" = none
    std::string config_path;  ///< "" = none
};

/// A model cache with its budgets. Move-only; thread-safe like the C context.
class Context {
public:
    explicit Context(const ContextOptions &options = {}, LogFn log = nullptr) {
        lowvram_context_params p;
        check(lowvram_context_params_init(&p, sizeof p));
        if (!options.device.empty()) p.device = options.device.c_str();
        if (!options.config_yaml.empty()) p.config_yaml = options.config_yaml.c_str();
        if (!options.config_path.empty()) p.config_path = options.config_path.c_str();
        if (log) {
            // The library owns the callback from here and deletes it when it will never call it again.
            p.log_callback = &Context::log_trampoline;
            p.log_user_data = new LogFn(std::move(log));
            p.log_user_data_release = &Context::log_release;
        }
        lowvram_context *raw = nullptr;
        check(lowvram_context_new(&p, &raw));
        handle_.reset(raw);
    }

    /// Apply YAML configuration (any subset of the keys) now; on error nothing changes.
    void configure(const std::string &yaml) const { check(lowvram_context_configure(handle_.get(), yaml.c_str())); }

    /// A snapshot of the cache's memory statistics.
    lowvram_cache_stats stats() const {
        lowvram_cache_stats s{};
        s.struct_size = sizeof s;
        check(lowvram_context_stats(handle_.get(), &s));
        return s;
    }

    /// Everything the cache knows, as JSON (device, ram, models, plan, sizing).
    std::string stats_json() const {
        char *raw = nullptr;
        check(lowvram_context_stats_json(handle_.get(), &raw));
        std::unique_ptr<char, void (*)(char *)> owned(raw, lowvram_string_free);
        return std::string(owned.get());
    }

    /// Free at least `bytes` of device memory held by models not in use; returns the bytes freed.
    std::uint64_t free_memory(std::uint64_t bytes) const {
        std::uint64_t freed = 0;
        check(lowvram_context_free_memory(handle_.get(), bytes, &freed));
        return freed;
    }

    /// Unload every model not in use from device and RAM cache; returns the bytes freed.
    std::uint64_t unload_all() const {
        std::uint64_t freed = 0;
        check(lowvram_context_unload_all(handle_.get(), &freed));
        return freed;
    }

    /// Stop every call running on this context now, at its next step or block (from another thread or a
    /// callback). Calls starting later are not affected: use a `CancelToken` to cancel one call.
    void cancel() const { check(lowvram_context_cancel(handle_.get())); }

    /// Replace the log callback (empty = the process-wide one); the old one is deleted once the library will never
    /// call it again.
    void set_log(LogFn log) const {
        if (!log) {
            check(lowvram_context_set_log_callback_ex(handle_.get(), nullptr, nullptr, nullptr));
            return;
        }
        check(lowvram_context_set_log_callback_ex(handle_.get(), &Context::log_trampoline, new LogFn(std::move(log)),
                                                  &Context::log_release));
    }

    /// Load a component folder (".../unet" or ".../vae") into the cache; `progress` (phases done, phases) and
    /// `cancel` may stop it (Error CANCELLED).
    Model load_model(const std::string &path, ProgressFn progress = nullptr, const CancelToken *cancel = nullptr) const {
        lowvram_model_load_params p;
        check(lowvram_model_load_params_init(&p, sizeof p));
        ProgressState state{&progress, nullptr};
        if (progress) {
            p.progress = &Context::progress_trampoline;
            p.progress_user_data = &state;
        }
        p.cancel_token = cancel ? cancel->capi() : nullptr;
        lowvram_model *raw = nullptr;
        lowvram_status status = lowvram_model_load_ex(handle_.get(), path.c_str(), &p, &raw);
        Model out(raw);
        if (state.error) std::rethrow_exception(state.error);
        check(status);
        return out;
    }

    /// Place up to `max_bytes` of `model` on the device now; returns the bytes resident afterwards.
    std::uint64_t load_to_device(const Model &model, std::uint64_t max_bytes) const {
        std::uint64_t resident = 0;
        check(lowvram_model_load_to_device(handle_.get(), model.capi(), max_bytes, &resident));
        return resident;
    }

    /// Reserve `bytes` of device memory for the host; returns once they are free.
    Reservation reserve(std::uint64_t bytes) const {
        lowvram_reservation *raw = nullptr;
        check(lowvram_reservation_new(handle_.get(), bytes, &raw));
        return Reservation(raw);
    }

    /// Reserve `bytes`, waiting at most `options.timeout_ms` for running calls to release them (also for running
    /// calls to end when the bytes do not fit beside them). Throws Error TIMEOUT, CANCELLED or BUDGET_TOO_SMALL
    /// (the message gives the bytes needed and available); nothing is held then.
    Reservation reserve(std::uint64_t bytes, const ReservationOptions &options) const {
        lowvram_reservation_params p;
        check(lowvram_reservation_params_init(&p, sizeof p));
        p.timeout_ms = options.timeout_ms;
        p.cancel_token = options.cancel ? options.cancel->capi() : nullptr;
        lowvram_reservation *raw = nullptr;
        check(lowvram_reservation_new_ex(handle_.get(), bytes, &p, &raw));
        return Reservation(raw);
    }

    /// Load a pipeline (family detected from the folder or file; components memory-mapped, nothing on the device
    /// yet).
    Pipeline load_pipeline(const PipelineOptions &options) const {
        lowvram_pipeline_params p;
        check(lowvram_pipeline_params_init(&p, sizeof p));
        p.path = options.path.c_str();
        if (!options.vae_path.empty()) p.vae_path = options.vae_path.c_str();
        if (!options.text_encoder_path.empty()) p.text_encoder_path = options.text_encoder_path.c_str();
        if (!options.text_encoder_2_path.empty()) p.text_encoder_2_path = options.text_encoder_2_path.c_str();
        lowvram_pipeline *raw = nullptr;
        check(lowvram_pipeline_load(handle_.get(), &p, &raw));
        return Pipeline(raw);
    }

    /// Encode `prompt` (UTF-8) with the pipeline's text encoders into the conditioning its denoiser takes.
    Conditioning encode_prompt(const Pipeline &pipeline, const std::string &prompt,
                               const PromptOptions &options = {}) const {
        lowvram_prompt_params p;
        check(lowvram_prompt_params_init(&p, sizeof p));
        if (options.negative_prompt) p.negative_prompt = options.negative_prompt->c_str();
        p.batch = options.batch;
        p.width = options.width;
        p.height = options.height;
        p.clip_skip = options.clip_skip;
        lowvram_conditioning *raw = nullptr;
        check(lowvram_pipeline_encode_prompt(handle_.get(), pipeline.capi(), prompt.c_str(), &p, &raw));
        return Conditioning(raw);
    }

    /// Denoise with the pipeline's denoiser from `cond` (`init_noise` [B, C, h, w] or nullptr: seeded, sized by
    /// `options`). Returns the final latents f32; errors, cancel and `report` as for `denoise` on a model.
    Tensor denoise(const Pipeline &pipeline, const Conditioning &cond, const DenoiseOptions &options,
                   const Tensor *init_noise = nullptr, lowvram_run_report *report = nullptr) const {
        lowvram_denoise_params p;
        ProgressState state{&options.progress, nullptr};
        fill(options, state, p, report);
        lowvram_tensor *raw = nullptr;
        lowvram_status status = lowvram_pipeline_denoise(handle_.get(), pipeline.capi(), cond.capi(), &p,
                                                         init_noise ? init_noise->capi() : nullptr, report, &raw);
        return finish(raw, state, status);
    }

    /// Decode latents with the pipeline's VAE into the image [B, 3, H, W] f32, ≈ [-1, 1].
    Tensor decode(const Pipeline &pipeline, const Tensor &latents, const DecodeOptions &options = {},
                  lowvram_run_report *report = nullptr) const {
        lowvram_decode_params p;
        ProgressState state{&options.progress, nullptr};
        fill(options, state, p, report);
        lowvram_tensor *raw = nullptr;
        lowvram_status status =
            lowvram_pipeline_decode(handle_.get(), pipeline.capi(), &p, latents.capi(), report, &raw);
        return finish(raw, state, status);
    }

    /// Run the sampler: `cond` [B, S, D]; `uncond` the same shape or nullptr (zeros); `init_noise` [B, 4, h, w] or
    /// nullptr (seeded). Returns the final latents [B, 4, h, w] f32; `report` (optional) receives the measurements,
    /// also when the run fails after it started. Throws Error (CANCELLED when the progress callback returned false
    /// or `options.cancel` was cancelled); rethrows the callback's own exception.
    Tensor denoise(const Model &unet, const DenoiseOptions &options, const Tensor &cond,
                   const Tensor *uncond = nullptr, const Tensor *init_noise = nullptr,
                   lowvram_run_report *report = nullptr) const {
        lowvram_denoise_params p;
        ProgressState state{&options.progress, nullptr};
        fill(options, state, p, report);
        lowvram_tensor *raw = nullptr;
        lowvram_status status = lowvram_denoise(handle_.get(), unet.capi(), &p, cond.capi(),
                                                uncond ? uncond->capi() : nullptr,
                                                init_noise ? init_noise->capi() : nullptr, report, &raw);
        return finish(raw, state, status);
    }

    /// Decode latents (as `denoise` returns them) into the image [B, 3, 8h, 8w] f32, ≈ [-1, 1].
    Tensor vae_decode(const Model &vae, const Tensor &latents, const DecodeOptions &options = {},
                      lowvram_run_report *report = nullptr) const {
        lowvram_decode_params p;
        ProgressState state{&options.progress, nullptr};
        fill(options, state, p, report);
        lowvram_tensor *raw = nullptr;
        lowvram_status status = lowvram_vae_decode(handle_.get(), vae.capi(), &p, latents.capi(), report, &raw);
        return finish(raw, state, status);
    }

    lowvram_context *capi() const noexcept { return handle_.get(); }
    explicit operator bool() const noexcept { return static_cast<bool>(handle_); }

private:
    struct ProgressState {
        const ProgressFn *fn;
        std::exception_ptr error;
    };

    /// The C params of `options` (progress through `state`), and `report` cleared with its struct_size.
    static void fill(const DenoiseOptions &options, ProgressState &state, lowvram_denoise_params &p,
                     lowvram_run_report *report) {
        check(lowvram_denoise_params_init(&p, sizeof p));
        p.scheduler = options.scheduler;
        p.karras = options.karras;
        p.steps = options.steps;
        p.guidance = options.guidance;
        p.seed = options.seed;
        p.latent_width = options.latent_width;
        p.latent_height = options.latent_height;
        p.step_noise = options.step_noise ? options.step_noise->capi() : nullptr;
        p.cancel_token = options.cancel ? options.cancel->capi() : nullptr;
        if (options.progress) {
            p.progress = &Context::progress_trampoline;
            p.progress_user_data = &state;
        }
        clear(report);
    }

    static void fill(const DecodeOptions &options, ProgressState &state, lowvram_decode_params &p,
                     lowvram_run_report *report) {
        check(lowvram_decode_params_init(&p, sizeof p));
        p.tile_latent = options.tile_latent;
        p.overlap_latent = options.overlap_latent;
        p.never_tile = options.never_tile;
        p.cancel_token = options.cancel ? options.cancel->capi() : nullptr;
        if (options.progress) {
            p.progress = &Context::progress_trampoline;
            p.progress_user_data = &state;
        }
        clear(report);
    }

    static void clear(lowvram_run_report *report) {
        if (report) {
            *report = lowvram_run_report{};
            report->struct_size = sizeof *report;
        }
    }

    /// The call's result: owned at once (freed on any throw), the callback's exception first, then the status.
    static Tensor finish(lowvram_tensor *raw, const ProgressState &state, lowvram_status status) {
        Tensor out(raw);
        if (state.error) std::rethrow_exception(state.error);
        check(status);
        return out;
    }

    static bool progress_trampoline(std::uint32_t step, std::uint32_t total, void *user_data) noexcept {
        auto *state = static_cast<ProgressState *>(user_data);
        try {
            return (*state->fn)(step, total);
        } catch (...) {
            state->error = std::current_exception();  // rethrown by denoise once the C call has returned
            return false;
        }
    }

    static void log_trampoline(lowvram_log_level level, const char *message, void *user_data) noexcept {
        auto *fn = static_cast<LogFn *>(user_data);
        try {
            (*fn)(level, message);
        } catch (...) {
            // exceptions must not cross into C
        }
    }

    static void log_release(void *user_data) noexcept { delete static_cast<LogFn *>(user_data); }

    detail::Owner<lowvram_context, lowvram_context_free> handle_;
};

}  // namespace lowvram

#endif  // LOWVRAM_HPP
