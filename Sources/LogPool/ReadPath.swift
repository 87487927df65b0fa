import Foundation
import LogPoolFormat
import Synchronization

/// The read path (Specs/COMMIT.md §7): a read is planned under the pool's lock (map
/// lookups, block locations, one tree descent per leaf) and executed outside it (`pread`,
/// checksum, LZ4), so reads run on several threads at once and never wait for a write's
/// work or a sync's fsync.
///
/// What a plan names must not be overwritten while it executes: block space becomes
/// reusable only when a checkpoint commits (free segments, holes), and the checkpoint
/// waits there for every read planned before it (``ReaderGate``).
struct ReadPlan {
    enum Step {
        /// Unmapped: zeros.
        case zeros(Range<Int>)
        /// Whole uncompressed blocks lying back to back: one `pread` straight into the
        /// destination, then each block's checksum.
        case direct(Range<Int>, byteOffset: UInt64, blocks: [(id: UInt64, location: BlockLocation)])
        /// Whole compressed blocks written back to back: one `pread` of their extents,
        /// then each one checked and expanded into the destination.
        case compressed(Range<Int>, byteOffset: UInt64, byteCount: Int, blocks: [(id: UInt64, location: BlockLocation)])
        /// Part of one block: read (and expand) it whole, copy the part.
        case partial(Range<Int>, id: UInt64, location: BlockLocation, offsetInBlock: Int)
    }

    var steps: [Step] = []
    let blockByteCount: Int

    /// Runs the plan: reads `device` and fills `destination`. Touches no engine state, so
    /// it may run outside the pool's lock (on a device that allows concurrent access).
    func execute(on device: BlockDevice, into destination: UnsafeMutableRawBufferPointer) throws {
        var scratch: [UInt8] = []
        for step in steps {
            switch step {
            case .zeros(let range):
                UnsafeMutableRawBufferPointer(rebasing: destination[range]).initializeMemory(as: UInt8.self, repeating: 0)
            case .direct(let range, let byteOffset, let blocks):
                let span = UnsafeMutableRawBufferPointer(rebasing: destination[range])
                try device.read(into: span, at: byteOffset)
                for (i, block) in blocks.enumerated() {
                    let piece = UnsafeRawBufferPointer(rebasing: span[(i * blockByteCount)..<((i + 1) * blockByteCount)])
                    try Engine.verify(piece, id: block.id, location: block.location)
                }
            case .compressed(let range, let byteOffset, let byteCount, let blocks):
                let stored = try device.read(byteCount: byteCount, at: byteOffset)
                try stored.withUnsafeBytes { raw in
                    for (i, block) in blocks.enumerated() {
                        let from = Int(block.location.byteOffset - byteOffset)
                        let piece = UnsafeRawBufferPointer(rebasing: raw[from..<from + Int(block.location.storedByteCount)])
                        try Engine.verify(piece, id: block.id, location: block.location)
                        let lower = range.lowerBound + i * blockByteCount
                        try Engine.expand(piece, into: UnsafeMutableRawBufferPointer(rebasing: destination[lower..<lower + blockByteCount]),
                                          id: block.id, location: block.location)
                    }
                }
            case .partial(let range, let id, let location, let offsetInBlock):
                if scratch.isEmpty { scratch = [UInt8](repeating: 0, count: blockByteCount) }
                try scratch.withUnsafeMutableBytes { try Engine.readBlock(id, location: location, from: device, into: $0) }
                scratch.withUnsafeBytes { raw in
                    UnsafeMutableRawBufferPointer(rebasing: destination[range])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[offsetInBlock..<offsetInBlock + range.count]))
                }
            }
        }
    }
}

/// Counts the reads executing outside the pool's lock. A reader enters while it holds
/// the lock (planning) and leaves without it; whoever is about to make block space
/// reusable, or close the device, waits with the lock held exclusively until none is
/// left. New readers need the lock to enter, so the wait ends. An atomic count: entering
/// and leaving sit on every read, the wait only at checkpoints and close, where polling
/// for the few reads in flight costs nothing that matters.
final class ReaderGate: Sendable {
    private let count = Atomic<Int>(0)

    func enter() { count.add(1, ordering: .acquiring) }

    func leave() { count.subtract(1, ordering: .releasing) }

    func waitUntilIdle() {
        while count.load(ordering: .acquiring) > 0 { usleep(20) }
    }
}

extension Engine {
    // MARK: - Checking blocks

    /// Throws `corrupt(data block)` unless `stored` matches block `id`'s checksum (promise 5:
    /// a bad checksum is an error, never data).
    static func verify(_ stored: UnsafeRawBufferPointer, id: UInt64, location: BlockLocation) throws {
        let sum = Checksum.xxh3(stored)
        guard sum == location.checksum else {
            throw PoolError.corrupt(structure: "data block", byteOffset: location.byteOffset,
                                    detail: "block id \(id): checksum mismatch: expected \(hex(location.checksum)), found \(hex(sum))")
        }
    }

    /// Decompresses verified stored bytes into exactly one block, or throws `corrupt`.
    static func expand(_ stored: UnsafeRawBufferPointer, into destination: UnsafeMutableRawBufferPointer,
                       id: UInt64, location: BlockLocation) throws {
        guard BlockCompression.decompress(stored, into: destination) else {
            throw PoolError.corrupt(structure: "data block", byteOffset: location.byteOffset,
                                    detail: "block id \(id): LZ4 data does not expand to \(destination.count) bytes")
        }
    }

    /// Reads and checks the block at `location` into `destination` (exactly one block).
    static func readBlock(_ id: UInt64, location: BlockLocation, from device: BlockDevice,
                          into destination: UnsafeMutableRawBufferPointer) throws {
        if !location.isCompressed && Int(location.storedByteCount) == destination.count {
            try device.read(into: destination, at: location.byteOffset)
            try verify(UnsafeRawBufferPointer(destination), id: id, location: location)
            return
        }
        let stored = try device.read(byteCount: Int(location.storedByteCount), at: location.byteOffset)
        try stored.withUnsafeBytes { try verify($0, id: id, location: location) }
        guard location.isCompressed else {
            throw PoolError.corrupt(structure: "data block", byteOffset: location.byteOffset,
                                    detail: "block id \(id): stored \(stored.count) bytes uncompressed, expected \(destination.count)")
        }
        try stored.withUnsafeBytes { try expand($0, into: destination, id: id, location: location) }
    }

    /// Reads and checks block `id` into `destination` (exactly one block), under the lock.
    func readBlock(_ id: UInt64, into destination: UnsafeMutableRawBufferPointer) throws {
        let location = try blockLocation(id)
        if writeBehindPending { try deviceCall {} }
        try Engine.readBlock(id, location: location, from: device, into: destination)
    }

    // MARK: - Planning reads

    /// The plan for reading `byteCount` bytes of `volume` from `byteOffset` (range checked
    /// by the caller). Runs of whole, uncompressed, physically adjacent blocks become one
    /// `pread`, as do runs of compressed blocks written back to back. Queued payload
    /// writes reach the device first, so the plan reads what the map says.
    /// The caller has drained queued payloads (``writeBehindPending`` is false): under
    /// the shared lock a drain would race a volume write queueing more.
    func planRead(_ volume: VolumeState, byteOffset: UInt64, byteCount: Int) throws -> ReadPlan {
        var plan = ReadPlan(blockByteCount: blockByteCount)
        let bs = UInt64(blockByteCount)
        let runLimit = 256
        var map = MapCursor(self, volume.map)
        var table = BlockTableCursor(self)
        func locate(_ id: UInt64) throws -> BlockLocation { try table.location(of: id) }
        var done = 0
        while done < byteCount {
            let position = byteOffset + UInt64(done)
            let blockIndex = position / bs
            let inBlock = Int(position % bs)
            let take = min(blockByteCount - inBlock, byteCount - done)
            let id = try map.id(at: blockIndex)
            if id == 0 {
                // Extend over the following unmapped blocks.
                var end = done + take
                var next = blockIndex + 1
                while end < byteCount, try map.id(at: next) == 0 {
                    end = min(end + blockByteCount, byteCount)
                    next += 1
                }
                plan.steps.append(.zeros(done..<end))
                done = end
                continue
            }
            let location = try locate(id)
            guard inBlock == 0 && take == blockByteCount else {
                plan.steps.append(.partial(done..<done + take, id: id, location: location, offsetInBlock: inBlock))
                done += take
                continue
            }
            var blocks: [(id: UInt64, location: BlockLocation)] = [(id, location)]
            var next = blockIndex + 1
            var extentEnd = location.byteOffset + (location.isCompressed ? location.allocatedByteCount : bs)
            while (blocks.count + 1) * blockByteCount <= byteCount - done, blocks.count < runLimit {
                let nextID = try map.id(at: next)
                guard nextID != 0 else { break }
                let nextLocation = try locate(nextID)
                if location.isCompressed {
                    guard nextLocation.isCompressed, nextLocation.byteOffset == extentEnd else { break }
                    extentEnd += nextLocation.allocatedByteCount
                } else {
                    guard !nextLocation.isCompressed, Int(nextLocation.storedByteCount) == blockByteCount,
                          nextLocation.byteOffset == extentEnd else { break }
                    extentEnd += bs
                }
                blocks.append((nextID, nextLocation))
                next += 1
            }
            let range = done..<done + blocks.count * blockByteCount
            if location.isCompressed {
                plan.steps.append(.compressed(range, byteOffset: location.byteOffset,
                                              byteCount: Int(extentEnd - location.byteOffset), blocks: blocks))
            } else if Int(location.storedByteCount) == blockByteCount {
                plan.steps.append(.direct(range, byteOffset: location.byteOffset, blocks: blocks))
            } else {
                plan.steps.append(.partial(done..<done + take, id: id, location: location, offsetInBlock: 0))
                done += take
                continue
            }
            done = range.upperBound
        }
        return plan
    }

}

/// The pool's lock (Specs/COMMIT.md §7), two locks taken in one order:
///
/// - the *writers' mutex*, held by every call that changes the engine's state, so
///   changes are serialised;
/// - the *read-write lock*, shared for planning reads (so reads on several threads plan
///   at once) and exclusive while the state reads plan from changes. A POSIX read-write
///   lock set to prefer writers, so a stream of reads cannot starve a write (glibc's
///   default prefers readers).
///
/// ``lock()`` takes both, as every change used to. A volume write takes only the
/// writers' mutex (``lockWriter()``) and the read-write lock exclusively just around
/// the part that changes what readers plan from (``enterExclusive()``,
/// `Engine.exclusively`), so reads plan while it admits, encodes, allocates and writes its
/// payload. ``wait()`` and ``broadcast()`` give the exclusive side a condition, for
/// group commit's waiters.
final class PoolLock: @unchecked Sendable {
    private let rw: UnsafeMutablePointer<pthread_rwlock_t>
    private let writers: UnsafeMutablePointer<pthread_mutex_t>
    private let changed = NSCondition()
    /// Bumped by ``broadcast()``, under `changed`.
    private var generation: UInt64 = 0

    init() {
        rw = .allocate(capacity: 1)
        var attributes = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attributes)
        pthread_rwlockattr_setkind_np(&attributes, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        pthread_rwlock_init(rw, &attributes)
        pthread_rwlockattr_destroy(&attributes)
        writers = .allocate(capacity: 1)
        pthread_mutex_init(writers, nil)
    }

    deinit {
        pthread_rwlock_destroy(rw)
        rw.deallocate()
        pthread_mutex_destroy(writers)
        writers.deallocate()
    }

    /// Both locks: the caller may change anything.
    func lock() {
        pthread_mutex_lock(writers)
        enterExclusive()
    }
    func unlock() {
        pthread_rwlock_unlock(rw)
        pthread_mutex_unlock(writers)
    }
    /// The read-write lock shared: the caller only reads what readers plan from.
    func lockShared() {
        for _ in 0..<Self.spinCount where pthread_rwlock_tryrdlock(rw) == 0 { return }
        pthread_rwlock_rdlock(rw)
    }
    func unlockShared() { pthread_rwlock_unlock(rw) }
    /// The writers' mutex alone: the caller is the only one changing the state, and takes
    /// ``enterExclusive()`` around changes to what readers plan from.
    func lockWriter() { pthread_mutex_lock(writers) }
    func unlockWriter() { pthread_mutex_unlock(writers) }
    /// With the writers' mutex held: the read-write lock exclusively.
    func enterExclusive() {
        for _ in 0..<Self.spinCount where pthread_rwlock_trywrlock(rw) == 0 { return }
        pthread_rwlock_wrlock(rw)
    }
    static let spinCount = 2000
    func leaveExclusive() { pthread_rwlock_unlock(rw) }

    /// Called with the lock held exclusively: releases it, waits for the next
    /// ``broadcast()``, takes it again.
    func wait() { waitForBroadcast(releasing: unlock, retaking: lock) }

    /// ``wait()`` for a caller holding the writers' mutex alone.
    func waitWriter() { waitForBroadcast(releasing: unlockWriter, retaking: lockWriter) }

    private func waitForBroadcast(releasing release: () -> Void, retaking retake: () -> Void) {
        changed.lock()
        let seen = generation
        changed.unlock()
        release()
        changed.lock()
        while generation == seen { changed.wait() }
        changed.unlock()
        retake()
    }

    /// Wakes every ``wait()`` and ``waitWriter()`` (called with the writers' mutex held).
    func broadcast() {
        changed.lock()
        generation &+= 1
        changed.broadcast()
        changed.unlock()
    }
}
