import CLZ4

/// LZ4 block compression from liblz4: the only caller of `CLZ4`.
public enum BlockCompression {
    /// Compresses `source` into a fresh buffer. Returns nil when LZ4 fails or the result
    /// would not be smaller than `limitByteCount` (the caller's "worth it" threshold).
    public static func compress(_ source: UnsafeRawBufferPointer, limitByteCount: Int) -> [UInt8]? {
        guard source.count > 0, limitByteCount > 0 else { return nil }
        // Output is capped at the caller's limit: LZ4 stops (returns 0) rather than write a
        // result that would not be stored anyway, and the buffer is never zero-filled.
        let capacity = limitByteCount - 1
        guard capacity > 0 else { return nil }
        var written: Int32 = 0
        let output = [UInt8](unsafeUninitializedCapacity: capacity) { out, initialized in
            written = LZ4_compress_default(
                source.baseAddress!.assumingMemoryBound(to: CChar.self),
                UnsafeMutableRawPointer(out.baseAddress!).assumingMemoryBound(to: CChar.self),
                Int32(source.count), Int32(capacity))
            initialized = max(0, Int(written))
        }
        guard written > 0 else { return nil }
        return output
    }

    /// Decompresses exactly `destination.count` bytes from `source`. Returns false when the
    /// input is malformed or does not expand to exactly that length; never reads or writes
    /// out of bounds (LZ4_decompress_safe is bounds-checked).
    public static func decompress(
        _ source: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer
    ) -> Bool {
        guard source.count > 0, destination.count > 0,
            source.count <= Int(Int32.max), destination.count <= Int(Int32.max)
        else { return false }
        let produced = LZ4_decompress_safe(
            source.baseAddress!.assumingMemoryBound(to: CChar.self),
            destination.baseAddress!.assumingMemoryBound(to: CChar.self),
            Int32(source.count), Int32(destination.count))
        return Int(produced) == destination.count
    }
}
