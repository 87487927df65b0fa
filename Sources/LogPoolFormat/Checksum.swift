import CXXHash

/// XXH3-64 from libxxhash: the only checksum LogPool writes. This file is the only caller
/// of `CXXHash`.
public enum Checksum {
    /// XXH3-64 of `bytes` with `seed`. Journal records and metadata pages are seeded with
    /// the pool's salt so that a record of another pool never verifies here.
    ///
    /// On x86-64 it calls libxxhash's runtime-dispatched entry point, which uses AVX2 or
    /// AVX-512 where the CPU has them (the plain entry point is the SSE2 baseline): the
    /// same hash, computed about twice as fast, and reads checksum every block they return.
    public static func xxh3(_ bytes: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        #if arch(x86_64)
        XXH3_64bits_withSeed_dispatch(bytes.baseAddress, bytes.count, seed)
        #else
        XXH3_64bits_withSeed(bytes.baseAddress, bytes.count, seed)
        #endif
    }

    public static func xxh3(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { xxh3($0, seed: seed) }
    }

    public static func xxh3(_ bytes: ArraySlice<UInt8>, seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { xxh3($0, seed: seed) }
    }
}

/// Streaming XXH3-64 over several buffers (a record's header and payload).
public struct XXH3Streaming: ~Copyable {
    private let state: OpaquePointer

    public init(seed: UInt64) {
        // XXH3_createState only fails when malloc fails: out of memory is not bad input.
        guard let created = XXH3_createState() else { preconditionFailure("XXH3_createState: out of memory") }
        state = created
        XXH3_64bits_reset_withSeed(state, seed)
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        #if arch(x86_64)
        XXH3_64bits_update_dispatch(state, bytes.baseAddress, bytes.count)
        #else
        XXH3_64bits_update(state, bytes.baseAddress, bytes.count)
        #endif
    }

    public func digest() -> UInt64 { XXH3_64bits_digest(state) }

    deinit { XXH3_freeState(state) }
}
