import Foundation
@testable import LogPool
import LogPoolTesting
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Reads outside the pool's lock and group-commit syncs (Specs/COMMIT.md §7).
@Suite("concurrency: reads outside the lock, group commit")
struct ConcurrencyTests {
    /// An in-memory device that allows concurrent access (every call takes its own lock,
    /// as `pread`/`pwrite`/`fdatasync` on a file are safe from many threads) and whose
    /// `sync()` can be held at a gate, to see what the pool does while an fsync runs.
    final class GatedDevice: BlockDevice, @unchecked Sendable {
        private let lock = NSLock()
        private var bytes: [UInt8]
        private let gate = NSCondition()
        private var held = false
        private var waiting = 0
        private(set) var syncCount = 0

        init(byteCount: Int) { bytes = [UInt8](repeating: 0, count: byteCount) }

        var allowsConcurrentAccess: Bool { true }

        func byteCount() throws -> UInt64 { lock.withLock { UInt64(bytes.count) } }

        func read(into buffer: UnsafeMutableRawBufferPointer, at byteOffset: UInt64) throws {
            lock.withLock {
                bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(byteOffset)..<Int(byteOffset) + buffer.count])) }
            }
        }

        func write(_ data: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
            lock.withLock {
                bytes.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(byteOffset)..<Int(byteOffset) + data.count]).copyMemory(from: data) }
            }
        }

        func sync() throws {
            gate.lock()
            syncCount += 1
            waiting += 1
            gate.broadcast()
            while held { gate.wait() }
            waiting -= 1
            gate.unlock()
        }

        /// From now on, syncs wait at the gate until ``release()``.
        func hold() { gate.withLock { held = true } }

        func release() {
            gate.lock()
            held = false
            gate.broadcast()
            gate.unlock()
        }

        /// Waits (up to 10 s) until a sync is waiting at the gate.
        func waitForSyncAtGate() -> Bool {
            gate.lock()
            defer { gate.unlock() }
            let deadline = Date().addingTimeInterval(10)
            while waiting == 0 { if !gate.wait(until: deadline) { return false } }
            return true
        }

        var syncs: Int { gate.withLock { syncCount } }
    }

    /// Runs `body` on a new thread; the semaphore is signalled when it returns.
    static func background(_ body: @escaping @Sendable () -> Void) -> DispatchSemaphore {
        let done = DispatchSemaphore(value: 0)
        Thread { body(); done.signal() }.start()
        return done
    }

    @Test("while a sync's fsync runs, reads and writes go on, and a sync with nothing new shares it")
    func workDuringFsync() throws {
        let device = GatedDevice(byteCount: 16 << 20)
        let pool = try Pool.create(on: device, capacity: 16 << 20, segmentSize: 256 << 10)
        let volume = try pool.createVolume(name: "v", size: 4 << 20)
        try volume.write(at: 0, from: pattern(64 << 10, seed: 1))
        device.hold()
        let syncsBefore = device.syncs
        let first = Self.background { try? pool.sync() }
        #expect(device.waitForSyncAtGate(), "the first sync reached its fsync")
        // The fsync is held: a read and a write on another thread still complete.
        let work = Self.background {
            let read = (try? volume.read(at: 0, length: 64 << 10)) ?? []
            #expect(read == pattern(64 << 10, seed: 1))
            #expect((try? volume.write(at: 1 << 20, from: pattern(8192, seed: 2))) != nil)
        }
        let finished = work.wait(timeout: .now() + 10) == .success
        #expect(finished, "reads and writes waited for an fsync in flight")
        device.release()
        first.wait()
        if !finished { work.wait() }
        // The write made during the fsync needs a sync of its own.
        let syncsAfterFirst = device.syncs
        #expect(syncsAfterFirst == syncsBefore + 1)
        try pool.sync()
        #expect(device.syncs == syncsAfterFirst + 1)
        try pool.sync()
        #expect(device.syncs == syncsAfterFirst + 1, "nothing new: no fsync")
        try pool.close()
        let reopened = try Pool.open(on: device)
        #expect(try reopened.openVolume(name: "v").read(at: 1 << 20, length: 8192) == pattern(8192, seed: 2))
        try reopened.close()
        #expect(try Pool.verify(on: device).errorCount == 0)
    }

    @Test("a sync called while another's fsync runs waits for it, and shares it when it covers its changes")
    func sharedFsync() throws {
        let device = GatedDevice(byteCount: 16 << 20)
        let pool = try Pool.create(on: device, capacity: 16 << 20, segmentSize: 256 << 10)
        let volume = try pool.createVolume(name: "v", size: 4 << 20)
        try volume.write(at: 0, from: pattern(4096, seed: 3))
        device.hold()
        let syncsBefore = device.syncs
        let first = Self.background { try? pool.sync() }
        #expect(device.waitForSyncAtGate())
        // Nothing written since: the second caller's changes are all in the fsync in
        // flight, which has not returned, so it must not return either.
        let returned = Atomic<Bool>(false)
        let second = Self.background {
            print("\(Date().timeIntervalSince1970) second starts")
            try? pool.sync()
            print("\(Date().timeIntervalSince1970) second returned")
            returned.store(true, ordering: .sequentiallyConsistent)
        }
        print("\(Date().timeIntervalSince1970) test waits")
        let waited = second.wait(timeout: .now() + 0.3) == .timedOut
        #expect(waited, "a sync returned before the fsync covering its changes ended")
        let returnedEarly = returned.load(ordering: .sequentiallyConsistent)
        #expect(!returnedEarly)
        device.release()
        first.wait()
        if waited { second.wait() }
        #expect(device.syncs == syncsBefore + 1, "the second sync shared the first one's fsync")
        try pool.close()
    }

    @Test("threads reading and writing their own ranges, syncing and checkpointing, always read what they wrote (seeded)",
          arguments: [UInt64(11), 12])
    func stress(seed: UInt64) throws {
        let path = NSTemporaryDirectory() + "logpool-concurrency-\(getpid())-\(seed).pool"
        unlink(path)
        defer { unlink(path) }
        let pool = try Pool.create(at: path, capacity: 32 << 20, segmentSize: 256 << 10)
        let threads = 4
        let blocksPerThread = 64
        let volume = try pool.createVolume(name: "v", size: UInt64(threads * blocksPerThread * 4096))
        let failures = Mutex<[String]>([])
        let group = DispatchGroup()
        for t in 0..<threads {
            group.enter()
            Thread {
                defer { group.leave() }
                var rng = SeededGenerator(seed: seed &* 31 &+ UInt64(t))
                var model = [UInt8](repeating: 0, count: blocksPerThread)  // the seed of each block's pattern, 0 = zeros
                let base = UInt64(t * blocksPerThread * 4096)
                for step in 0..<400 {
                    let block = Int(rng.next() % UInt64(blocksPerThread))
                    let offset = base + UInt64(block * 4096)
                    do {
                        switch rng.next() % 10 {
                        case 0..<4:
                            let value = UInt8(truncatingIfNeeded: rng.next() % 250 + 1)
                            try volume.write(at: offset, from: pattern(4096, seed: value))
                            model[block] = value
                        case 4..<8:
                            let read = try volume.read(at: offset, length: 4096)
                            let expected = model[block] == 0 ? [UInt8](repeating: 0, count: 4096) : pattern(4096, seed: model[block])
                            if read != expected { failures.withLock { $0.append("seed \(seed) thread \(t) step \(step): block \(block) read wrong bytes") } }
                        case 8:
                            try pool.sync()
                        default:
                            if t == 0 && step % 50 == 0 { try pool.checkpoint() } else { try pool.sync() }
                        }
                    } catch {
                        failures.withLock { $0.append("seed \(seed) thread \(t) step \(step): \(error)") }
                    }
                }
                // Whole-range read at the end equals the model.
                if let all = try? volume.read(at: base, length: blocksPerThread * 4096) {
                    for block in 0..<blocksPerThread {
                        let expected = model[block] == 0 ? [UInt8](repeating: 0, count: 4096) : pattern(4096, seed: model[block])
                        if Array(all[(block * 4096)..<((block + 1) * 4096)]) != expected {
                            failures.withLock { $0.append("seed \(seed) thread \(t): final read of block \(block) wrong") }
                        }
                    }
                }
            }.start()
        }
        group.wait()
        let found = failures.withLock { $0 }
        #expect(found.isEmpty, "\(found.prefix(5))")
        try pool.close()
        let report = try Pool.verify(at: path)
        #expect(report.errorCount == 0, "seed \(seed): \(report.findings.prefix(3))")
    }

    /// Volume writes hold only the writers' mutex and take the read-write lock
    /// exclusively just to apply (COMMIT §7.3), so reads plan while a write admits,
    /// allocates, queues its payload, checkpoints or compacts. A read must still be one
    /// moment of the volume: each 96 KiB chunk is rewritten whole (one record, payload
    /// through the write-behind thread) on a pool small enough that writes checkpoint and
    /// reuse freed segments and holes, and
    /// readers on other threads must always see one whole version of a chunk that was
    /// written, never a mix, zeros or an error.
    @Test("reads racing large overwrites that checkpoint and reuse space inside the write see one whole written version (seeded)",
          arguments: [UInt64(21), 22, 23])
    func readsDuringCompactingWrites(seed: UInt64) throws {
        // Seed 23 keeps two block-table pages resident (the table has about 17 leaves):
        // readers read leaves back and drop them under the shared lock while the writer
        // changes others (COMMIT §3.1).
        let cache = seed == 23 ? 8192 : Pool.defaultMetadataCacheBytes
        let path = NSTemporaryDirectory() + "logpool-concurrency-compact-\(getpid())-\(seed).pool"
        unlink(path)
        defer { unlink(path) }
        // 96 KiB chunks across 256 KiB segments: overwrites leave segments partly live,
        // so only compaction gets their space back.
        let chunk = 96 << 10, chunks = 120
        let pool = try Pool.create(at: path, capacity: 16 << 20, segmentSize: 256 << 10, compression: .none,
                                   metadataCacheBytes: cache)
        let volume = try pool.createVolume(name: "v", size: UInt64(chunk * chunks))
        @Sendable func content(_ version: UInt8) -> [UInt8] {
            let block = pattern(4096, seed: version)
            return Array((0..<(chunk / 4096)).map { _ in block }.joined())
        }
        // Versions each chunk has been (or is being) written with; 1 for all at first.
        let written = Mutex([Set<UInt8>](repeating: [1], count: chunks))
        let first = content(1)
        for c in 0..<chunks { try volume.write(at: UInt64(c * chunk), from: first) }
        try pool.sync()
        let done = Atomic<Bool>(false)
        let failures = Mutex<[String]>([])
        let readers = (0..<2).map { r in
            ConcurrencyTests.background {
                var rng = SeededGenerator(seed: seed &* 7 &+ UInt64(r))
                var reads = 0
                while !done.load(ordering: .acquiring) || reads < 50 {
                    let c = Int(rng.next() % UInt64(chunks))
                    do {
                        let bytes = try volume.read(at: UInt64(c * chunk), length: chunk)
                        reads += 1
                        let candidates = written.withLock { $0[c] }
                        let head = Array(bytes[0..<4096])
                        let whole = (1..<(chunk / 4096)).allSatisfy { b in bytes[(b * 4096)..<((b + 1) * 4096)].elementsEqual(head) }
                        if !whole || !candidates.contains(where: { pattern(4096, seed: $0) == head }) {
                            failures.withLock { $0.append("seed \(seed) reader \(r): chunk \(c) is none of versions \(candidates.sorted())") }
                        }
                    } catch {
                        failures.withLock { $0.append("seed \(seed) reader \(r): chunk \(c): \(error)") }
                    }
                }
            }
        }
        var rng = SeededGenerator(seed: seed)
        for step in 0..<300 {
            let c = Int(rng.next() % UInt64(chunks))
            let version = UInt8(truncatingIfNeeded: rng.next() % 250 + 2)
            written.withLock { _ = $0[c].insert(version) }
            do {
                try volume.write(at: UInt64(c * chunk), from: content(version))
                if step % 16 == 0 { try pool.sync() }
            } catch {
                failures.withLock { $0.append("seed \(seed) writer step \(step): \(error)") }
            }
        }
        done.store(true, ordering: .releasing)
        for reader in readers { reader.wait() }
        let found = failures.withLock { $0 }
        #expect(found.isEmpty, "\(found.prefix(5))")
        // The race is only tested when writes had to make space reusable: more was written
        // than the pool holds, so checkpoints inside the writes freed segments and found
        // holes (and compaction ran where that was not enough) while reads ran.
        #expect(UInt64(chunk * (chunks + 300)) > 2 * pool.stats.capacityBytes)
        if seed == 23 {
            #expect(pool.engine.pageCache.evictionCount > 0, "seed 23: the two-page cache never dropped a leaf")
        }
        try pool.close()
        let report = try Pool.verify(at: path)
        #expect(report.errorCount == 0, "seed \(seed): \(report.findings.prefix(3))")
    }
}
