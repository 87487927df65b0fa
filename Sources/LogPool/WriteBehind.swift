import Foundation
import LogPoolFormat

/// Block payload writes handed to one background thread, so that the kernel's copy into
/// the page cache overlaps the next unit's checksums, compression and metadata work
/// (Specs/COMMIT.md §2.1).
///
/// Only the payload writes of ``Engine/writeBlocks(_:indexes:contents:unmapRanges:)`` come
/// here. Every other device call of the engine drains the queue first, so the device sees
/// the same writes in the same order as without it; nothing is reordered around a sync.
/// A failed write is kept and thrown by the next `enqueue` or `drain`; the writes queued
/// after it are dropped (fail-stop: nothing is retried, the engine is poisoned).
final class WriteBehind: @unchecked Sendable {
    /// Queued bytes beyond which `enqueue` waits: enough to overlap a few 1 MiB units,
    /// small enough to bound memory.
    static let limitByteCount = 4 << 20
    /// Payloads smaller than this are written synchronously (see `deviceWritePayload`).
    static let minimumByteCount = 64 << 10

    private let device: BlockDevice
    private let condition = NSCondition()
    // Everything below is guarded by `condition`.
    private var jobs: [(byteOffset: UInt64, bytes: [UInt8])] = []
    private var head = 0
    private var queuedByteCount = 0
    private var writing = false
    private var failure: (any Error)? = nil
    private var stopping = false
    private var stopped = false
    /// Buffers of finished jobs, reused for the next copies (no page faults per unit).
    private var spares: [[UInt8]] = []

    init(device: BlockDevice) {
        self.device = device
        let thread = Thread { [self] in run() }
        thread.name = "logpool-write-behind"
        thread.start()
    }

    /// Queues `bytes` for writing at `byteOffset`, waiting while the queue is full.
    /// Throws the failure of an earlier queued write.
    func enqueue(_ bytes: [UInt8], at byteOffset: UInt64) throws {
        condition.lock()
        defer { condition.unlock() }
        while failure == nil && queuedByteCount > 0 && queuedByteCount + bytes.count > Self.limitByteCount {
            condition.wait()
        }
        if let failure { throw failure }
        precondition(!stopping, "write-behind used after shutdown")
        jobs.append((byteOffset, bytes))
        queuedByteCount += bytes.count
        condition.broadcast()
    }

    /// Queues a copy of `bytes` (the caller's buffer is only borrowed for this call).
    func enqueue(copying bytes: UnsafeRawBufferPointer, at byteOffset: UInt64) throws {
        condition.lock()
        var buffer = spares.popLast() ?? []
        condition.unlock()
        buffer.removeAll(keepingCapacity: true)
        buffer.append(contentsOf: bytes)
        try enqueue(buffer, at: byteOffset)
    }

    /// Waits until every queued write has reached the device; throws the first failure.
    func drain() throws {
        condition.lock()
        defer { condition.unlock() }
        while failure == nil && (head < jobs.count || writing) { condition.wait() }
        if let failure { throw failure }
    }

    /// Finishes the queued writes (not a sync) and stops the thread. Idempotent; the
    /// device is not touched by this object afterwards.
    func shutdown() {
        condition.lock()
        stopping = true
        condition.broadcast()
        while !stopped { condition.wait() }
        condition.unlock()
    }

    private func run() {
        condition.lock()
        while true {
            while head == jobs.count && !stopping { condition.wait() }
            if head == jobs.count {
                stopped = true
                condition.broadcast()
                condition.unlock()
                return
            }
            let job = jobs[head]
            jobs[head].bytes = []
            head += 1
            let skip = failure != nil
            writing = true
            condition.unlock()
            var error: (any Error)? = nil
            if !skip {
                do { try device.write(job.bytes, at: job.byteOffset) } catch let caught { error = caught }
            }
            condition.lock()
            writing = false
            queuedByteCount -= job.bytes.count
            if failure == nil, let error { failure = error }
            if head == jobs.count {
                jobs.removeAll(keepingCapacity: true)
                head = 0
            }
            if spares.count < 4 && job.bytes.capacity >= Engine.atomicUnitByteCount / 2 { spares.append(job.bytes) }
            condition.broadcast()
        }
    }
}
