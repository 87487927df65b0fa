import CLZ4

/// LZ4 block compression from liblz4: the only caller of `CLZ4`.
public enum BlockCompression {
    /// Compresses `source` into a fresh buffer. Returns nil when LZ4 fails or the result
    /// would not be smaller than `limitByteCount` (the caller's "worth it" threshold).
    public static func compress(_ source: UnsafeRawBufferPointer, limitByteCount: Int) -> [UInt8]? {
        guard source.count > 0, limitByteCount > 0 else { return nil }
        let bound = Int(LZ4_compressBound(Int32(source.count)))
        var output = [UInt8](repeating: 0, count: bound)
        let written = output.withUnsafeMutableBytes { out -> Int32 in
            LZ4_compress_default(
                source.baseAddress!.assumingMemoryBound(to: CChar.self),
                out.baseAddress!.assumingMemoryBound(to: CChar.self),
                Int32(source.count), Int32(bound))
        }
        guard written > 0, Int(written) < limitByteCount else { return nil }
        output.removeLast(output.count - Int(written))
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
