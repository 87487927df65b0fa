import LogPool

/// An in-memory ``BlockDevice`` that models power loss (CRASH-TESTING.md §3.1).
///
/// `durable` is the image as of the last successful sync; `pending` lists every write
/// since, in order; reads see `durable` with `pending` applied. ``crashImage(using:)``
/// builds what a disk could hold after power loss: each pending write independently
/// vanishes, survives, or survives only for a prefix of its sectors (a torn write).
public final class SimulatedDevice: BlockDevice, @unchecked Sendable {
    public static let sectorByteCount = 512
    public private(set) var durable: [UInt8]
    private(set) var current: [UInt8]
    public private(set) var pending: [(byteOffset: Int, bytes: [UInt8])] = []
    public private(set) var syncCount = 0
    public private(set) var writeCount = 0
    /// When set, the write with this ordinal (1-based, counted from creation) fails with EIO.
    public var failWriteAt: Int? = nil
    /// When set, the sync with this ordinal fails with EIO and drops all pending writes.
    public var failSyncAt: Int? = nil

    public init(byteCount: Int) {
        durable = [UInt8](repeating: 0, count: byteCount)
        current = durable
    }

    public init(image: [UInt8]) {
        durable = image
        current = image
    }

    public func byteCount() throws -> UInt64 { UInt64(current.count) }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at byteOffset: UInt64) throws {
        guard byteOffset <= UInt64(current.count), UInt64(buffer.count) <= UInt64(current.count) - byteOffset else {
            throw PoolError.corrupt(structure: "pool file", byteOffset: byteOffset, detail: "file ends before the \(buffer.count) bytes to read")
        }
        current.withUnsafeBytes { raw in
            buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[Int(byteOffset)..<Int(byteOffset) + buffer.count]))
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
        writeCount += 1
        if let failAt = failWriteAt, writeCount == failAt {
            throw PoolError.io(errno: 5, operation: "simulated write failure", byteOffset: byteOffset)
        }
        let start = Int(byteOffset)
        precondition(start + bytes.count <= current.count, "write past the device end")
        current.withUnsafeMutableBytes { raw in
            UnsafeMutableRawBufferPointer(rebasing: raw[start..<start + bytes.count]).copyMemory(from: bytes)
        }
        pending.append((start, Array(bytes)))
    }

    /// Called at the start of every sync, before the pending writes become durable: the
    /// crash enumerator builds its images here.
    public var beforeSync: ((SimulatedDevice) -> Void)? = nil

    public func sync() throws {
        beforeSync?(self)
        syncCount += 1
        if let failAt = failSyncAt, syncCount == failAt {
            // fsyncgate: the kernel dropped the dirty pages; reads now see the old bytes.
            pending.removeAll()
            current = durable
            throw PoolError.io(errno: 5, operation: "simulated fdatasync failure", byteOffset: 0)
        }
        for write in pending {
            durable.replaceSubrange(write.byteOffset..<write.byteOffset + write.bytes.count, with: write.bytes)
        }
        pending.removeAll()
    }

    /// The image after a power loss now. Each pending write is dropped, kept, or torn to a
    /// random prefix of its sectors, chosen by `generator`.
    public func crashImage(using generator: inout some RandomNumberGenerator) -> [UInt8] {
        var image = durable
        for write in pending {
            let sectors = (write.bytes.count + Self.sectorByteCount - 1) / Self.sectorByteCount
            let kept = min(write.bytes.count, Int.random(in: 0...sectors, using: &generator) * Self.sectorByteCount)
            image.replaceSubrange(write.byteOffset..<write.byteOffset + kept, with: write.bytes[0..<kept])
        }
        return image
    }

    /// The image after power loss where pending write i kept the sector range
    /// `kept[i]` (nil or an empty range: dropped). Sectors outside every kept range hold
    /// their durable bytes.
    public func image(keeping kept: [Range<Int>?]) -> [UInt8] {
        var image = durable
        for (i, write) in pending.enumerated() {
            guard i < kept.count, let range = kept[i], !range.isEmpty else { continue }
            let lower = min(range.lowerBound * Self.sectorByteCount, write.bytes.count)
            let upper = min(range.upperBound * Self.sectorByteCount, write.bytes.count)
            guard lower < upper else { continue }
            image.replaceSubrange((write.byteOffset + lower)..<(write.byteOffset + upper), with: write.bytes[lower..<upper])
        }
        return image
    }

    /// The image a device with `physicalSectorByteCount`-byte sectors could hold after
    /// power loss: as ``image(keeping:)``, and in addition every physical sector that a
    /// not-fully-kept write covers only partly is garbage (random bytes). That is the
    /// read-modify-write hazard: bytes next to a write, even synced ones, can be
    /// destroyed when the write tears.
    public func image(keeping kept: [Range<Int>?], physicalSectorByteCount: Int,
                      using generator: inout some RandomNumberGenerator) -> [UInt8] {
        var result = image(keeping: kept)
        for (i, write) in pending.enumerated() {
            let sectors = (write.bytes.count + Self.sectorByteCount - 1) / Self.sectorByteCount
            let keptRange = i < kept.count ? kept[i] : nil
            if let range = keptRange, range == 0..<sectors { continue }
            let start = write.byteOffset, end = write.byteOffset + write.bytes.count
            for edge in [start, end - 1] {
                let sectorStart = edge / physicalSectorByteCount * physicalSectorByteCount
                let sectorEnd = sectorStart + physicalSectorByteCount
                let coversWhole = start <= sectorStart && end >= sectorEnd
                guard !coversWhole, sectorEnd <= result.count else { continue }
                for j in sectorStart..<sectorEnd { result[j] = UInt8.random(in: 0...255, using: &generator) }
            }
        }
        return result
    }

    /// Sectors each pending write spans.
    public var pendingSectorCounts: [Int] {
        pending.map { ($0.bytes.count + Self.sectorByteCount - 1) / Self.sectorByteCount }
    }

    /// The image keeping exactly the first `count` pending writes, whole (a prefix crash).
    public func prefixImage(keeping count: Int) -> [UInt8] {
        var image = durable
        for write in pending.prefix(count) {
            image.replaceSubrange(write.byteOffset..<write.byteOffset + write.bytes.count, with: write.bytes)
        }
        return image
    }

    /// The image as it is now (every write kept), as after `kill -9` with a page cache.
    public var currentImage: [UInt8] { current }
}

/// A small, fast, seedable generator (SplitMix64), so every randomized test replays from
/// its printed seed.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
