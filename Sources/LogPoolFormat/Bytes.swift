/// Little-endian encoder into a growing byte array.
public struct ByteWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 64) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public var byteCount: Int { bytes.count }

    public mutating func u8(_ value: UInt8) { bytes.append(value) }
    public mutating func u16(_ value: UInt16) { append(littleEndian: value) }
    public mutating func u32(_ value: UInt32) { append(littleEndian: value) }
    public mutating func u64(_ value: UInt64) { append(littleEndian: value) }
    public mutating func i64(_ value: Int64) { append(littleEndian: UInt64(bitPattern: value)) }
    public mutating func append(_ raw: [UInt8]) { bytes.append(contentsOf: raw) }
    public mutating func zeros(_ count: Int) { bytes.append(contentsOf: repeatElement(0, count: count)) }

    /// A UInt16 length followed by the UTF-8 bytes.
    public mutating func string(_ value: String) {
        let utf8 = Array(value.utf8)
        precondition(utf8.count <= Int(UInt16.max), "string field longer than 65535 bytes")
        u16(UInt16(utf8.count))
        append(utf8)
    }

    /// Overwrites 8 bytes at `offset` (used to fill in a checksum after the fact).
    public mutating func patch(u64 value: UInt64, at offset: Int) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { raw in
            for i in 0..<8 { bytes[offset + i] = raw[i] }
        }
    }

    private mutating func append<T: FixedWidthInteger>(littleEndian value: T) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { bytes.append(contentsOf: $0) }
    }
}

/// Little-endian decoder over a byte buffer that throws, never traps, when the buffer is
/// too short. `structure` and `baseByteOffset` go into every error it throws.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var position: Int
    public let structure: String
    public let baseByteOffset: UInt64

    public init(_ bytes: [UInt8], structure: String, baseByteOffset: UInt64 = 0, position: Int = 0) {
        self.bytes = bytes
        self.structure = structure
        self.baseByteOffset = baseByteOffset
        self.position = position
    }

    public var remainingByteCount: Int { bytes.count - position }

    public func error(_ detail: String, at offset: Int? = nil) -> CorruptionError {
        CorruptionError(structure, at: baseByteOffset &+ UInt64(offset ?? position), detail)
    }

    public mutating func require(_ count: Int, for field: String) throws(CorruptionError) {
        guard count >= 0, count <= remainingByteCount else {
            throw error("truncated \(field): need \(count) bytes, \(remainingByteCount) left")
        }
    }

    public mutating func u8(_ field: String = "field") throws(CorruptionError) -> UInt8 {
        try require(1, for: field)
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func u16(_ field: String = "field") throws(CorruptionError) -> UInt16 {
        try integer(UInt16.self, field)
    }

    public mutating func u32(_ field: String = "field") throws(CorruptionError) -> UInt32 {
        try integer(UInt32.self, field)
    }

    public mutating func u64(_ field: String = "field") throws(CorruptionError) -> UInt64 {
        try integer(UInt64.self, field)
    }

    public mutating func i64(_ field: String = "field") throws(CorruptionError) -> Int64 {
        Int64(bitPattern: try integer(UInt64.self, field))
    }

    public mutating func raw(_ count: Int, _ field: String = "field") throws(CorruptionError) -> [UInt8] {
        try require(count, for: field)
        defer { position += count }
        return Array(bytes[position..<position + count])
    }

    public mutating func skip(_ count: Int, _ field: String = "field") throws(CorruptionError) {
        try require(count, for: field)
        position += count
    }

    /// A UInt16 length followed by that many UTF-8 bytes; invalid UTF-8 is an error.
    public mutating func string(_ field: String) throws(CorruptionError) -> String {
        let start = position
        let count = Int(try u16(field + " length"))
        let utf8 = try raw(count, field)
        guard let value = String(validating: utf8, as: UTF8.self) else {
            throw error("\(field) is not valid UTF-8", at: start)
        }
        return value
    }

    private mutating func integer<T: FixedWidthInteger>(_ type: T.Type, _ field: String) throws(CorruptionError) -> T {
        let size = MemoryLayout<T>.size
        try require(size, for: field)
        let value = bytes.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: position, as: T.self) }
        position += size
        return T(littleEndian: value)
    }
}

extension UnsafeRawBufferPointer {
    /// Little-endian load at `offset`; the caller has checked the bounds.
    @inlinable
    public func loadLE<T: FixedWidthInteger>(_ type: T.Type, at offset: Int) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}
