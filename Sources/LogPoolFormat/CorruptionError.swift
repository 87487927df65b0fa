/// Bad bytes read from the pool file. Decoders throw this and never trap.
///
/// `structure` names what was being decoded ("superblock slot A", "journal record",
/// "checkpoint", "map page", …), `byteOffset` is its offset in the pool file (or in the
/// buffer when the caller did not know the file offset), and `detail` says what was
/// expected and what was found.
public struct CorruptionError: Error, Equatable, Sendable, CustomStringConvertible {
    public var structure: String
    public var byteOffset: UInt64
    public var detail: String

    public init(_ structure: String, at byteOffset: UInt64, _ detail: String) {
        self.structure = structure
        self.byteOffset = byteOffset
        self.detail = detail
    }

    /// The same error re-based at a file offset (decoders work on buffers).
    public func located(at fileByteOffset: UInt64) -> CorruptionError {
        CorruptionError(structure, at: fileByteOffset &+ byteOffset, detail)
    }

    public var description: String { "\(structure) at byte offset \(byteOffset): \(detail)" }
}
