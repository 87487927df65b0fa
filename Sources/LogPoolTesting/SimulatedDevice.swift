import LogPool

/// An in-memory ``BlockDevice`` that models power loss (Specs/CRASH-MODEL.md §1).
///
/// `durable` is the image as of the last successful sync; `pending` lists every write
/// since, in order; reads see `durable` with `pending` applied. ``CrashSimulator`` builds
/// the crash states from `durable` and `pending` (as patches over the durable image).
public final class SimulatedDevice: BlockDevice, @unchecked Sendable {
    public static let sectorByteCount = 512
    public private(set) var durable: [UInt8]
    private(set) var current: [UInt8]
    public private(set) var pending: [(byteOffset: Int, bytes: [UInt8])] = []
    public private(set) var syncCount = 0
    public private(set) var writeCount = 0
    /// When set, the write with this ordinal (1-based, counted from creation) fails.
    public var failWriteAt: Int? = nil
    /// The errno of the failing write: EIO (5) or ENOSPC (28, a full file system under a
    /// sparse pool file).
    public var failWriteErrno: Int32 = 5
    /// When set, the failing write first stores this many of its bytes (a short write:
    /// `pwrite` returned a count, then the retry for the rest failed).
    public var failWriteShortByteCount: Int? = nil
    /// When true, every write from `failWriteAt` on fails (the disk stays full), not just
    /// that one.
    public var failWritePersistent = false
    /// Every 512-byte sector any write has touched, in first-touch order (the media
    /// damage class picks its targets here: damage to never-written space is invisible).
    public private(set) var touchedSectors: [Int] = []
    private var touched = Set<Int>()
    /// When set, the sync with this ordinal fails with EIO and drops the pending writes.
    public var failSyncAt: Int? = nil
    /// When set, the failing sync lets a seeded random subset of the pending writes reach
    /// the disk before dropping the rest (fsyncgate: some pages were written back, the
    /// failed ones are forgotten, and the next sync would succeed).
    public var failSyncKeepSeed: UInt64? = nil

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
        let start = Int(byteOffset)
        precondition(start + bytes.count <= current.count, "write past the device end")
        beforeWrite?(self, start, bytes)
        if let failAt = failWriteAt, writeCount == failAt || (failWritePersistent && writeCount > failAt) {
            if writeCount == failAt, let short = failWriteShortByteCount, short > 0 {
                store(UnsafeRawBufferPointer(rebasing: bytes[0..<min(short, bytes.count)]), at: start)
            }
            throw PoolError.io(errno: failWriteErrno, operation: "simulated write failure", byteOffset: byteOffset)
        }
        store(bytes, at: start)
    }

    private func store(_ bytes: UnsafeRawBufferPointer, at start: Int) {
        current.withUnsafeMutableBytes { raw in
            UnsafeMutableRawBufferPointer(rebasing: raw[start..<start + bytes.count]).copyMemory(from: bytes)
        }
        pending.append((start, Array(bytes)))
        guard !bytes.isEmpty else { return }
        for sector in (start / Self.sectorByteCount)...((start + bytes.count - 1) / Self.sectorByteCount) where touched.insert(sector).inserted {
            touchedSectors.append(sector)
        }
    }

    /// Called at the start of every sync, before the pending writes become durable: the
    /// crash enumerator builds its images here.
    public var beforeSync: ((SimulatedDevice) -> Void)? = nil
    /// The writes the last successful sync that had any made durable (the newest synced
    /// batch), each with the bytes it covered before that epoch.
    public private(set) var previousEpoch: [(byteOffset: Int, bytes: [UInt8], before: [UInt8])] = []
    /// Called with every write before it lands (the write-time checks W1-W4).
    public var beforeWrite: ((SimulatedDevice, Int, UnsafeRawBufferPointer) -> Void)? = nil
    /// Called after every successful sync, when `durable` holds the new image.
    public var afterSync: ((SimulatedDevice) -> Void)? = nil

    public func sync() throws {
        beforeSync?(self)
        syncCount += 1
        if let failAt = failSyncAt, syncCount == failAt {
            // fsyncgate: the kernel dropped the dirty pages it could not write; reads now
            // see what reached the disk.
            if let keep = failSyncKeepSeed {
                var generator = SeededGenerator(seed: keep)
                for write in pending where Bool.random(using: &generator) {
                    durable.replaceSubrange(write.byteOffset..<write.byteOffset + write.bytes.count, with: write.bytes)
                }
            }
            pending.removeAll()
            current = durable
            throw PoolError.io(errno: 5, operation: "simulated fdatasync failure", byteOffset: 0)
        }
        // The bytes each write of this epoch covers, as they were before the epoch (what
        // a lying sync, C12, may still leave there).
        // Kept only for an epoch that wrote something: an empty sync leaves the newest
        // synced batch what it was.
        if !pending.isEmpty {
            previousEpoch = pending.map { write in
                (write.byteOffset, write.bytes, Array(durable[write.byteOffset..<write.byteOffset + write.bytes.count]))
            }
        }
        for write in pending {
            durable.replaceSubrange(write.byteOffset..<write.byteOffset + write.bytes.count, with: write.bytes)
        }
        pending.removeAll()
        afterSync?(self)
    }

    /// Sectors each pending write spans.
    public var pendingSectorCounts: [Int] {
        pending.map { ($0.bytes.count + Self.sectorByteCount - 1) / Self.sectorByteCount }
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
