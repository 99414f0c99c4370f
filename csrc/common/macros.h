#pragma once
// Lets one inline function serve CPU code, CUDA device code and host-side shape math.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PE_HOST_DEVICE __host__ __device__
#else
#define PE_HOST_DEVICE
#endif
