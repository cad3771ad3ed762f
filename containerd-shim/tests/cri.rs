//! The shim behind Kubernetes' CRI: a private containerd 1.6 with its CRI plugin, runtime
//! handler `xenvgpu` → `io.containerd.xenvgpu.v2`, and a small CRI v1 client (crictl is not
//! packaged in Debian 12) making the calls kubelet makes for a pod: RunPodSandbox,
//! CreateContainer, StartContainer, ExecSync, ContainerStatus, StopPodSandbox,
//! RemovePodSandbox. The host-process test double runs the processes (no zone); host network
//! only (no CNI here). Same preconditions as the containerd test.

mod common;

use common::*;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

async fn connect(sock: std::path::PathBuf) -> RuntimeServiceClient<Channel> {
    let channel = Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?)) }
        }))
        .await
        .expect("connecting to containerd's CRI socket");
    RuntimeServiceClient::new(channel)
}

fn sandbox_config(dir: &std::path::Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "trainer".into(),
            uid: "pod-uid-1".into(),
            namespace: "ml".into(),
            attempt: 0,
        }),
        log_directory: dir.join("pod-logs").display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption { network: NamespaceMode::Node as i32, ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_pod_runs_through_cri_with_the_xenvgpu_handler() {
    if !ready() {
        return;
    }
    let dir = test_dir("cri");
    let archive = build_image(&dir);
    let d = Daemon::start(&dir, true);
    d.ok(&["images", "import", archive.to_str().unwrap()]);
    let mut cri = connect(dir.join("containerd.sock")).await;
    let version = cri
        .version(VersionRequest::default())
        .await
        .unwrap_or_else(|e| panic!("CRI Version: {e}\n{}", d.log()))
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");

    let config = sandbox_config(&dir);
    std::fs::create_dir_all(&config.log_directory).unwrap();
    let pod = cri
        .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: "xenvgpu".into() })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", d.log()))
        .into_inner()
        .pod_sandbox_id;
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata { name: "app".into(), attempt: 0 }),
        image: Some(ImageSpec { image: IMAGE.into(), ..Default::default() }),
        command: vec!["/bin/sh".into(), "-c".into(), "echo app-started $ROLE; exec /bin/sleep 600".into()],
        envs: vec![KeyValue { key: "ROLE".into(), value: "trainer".into() }],
        log_path: "app.log".into(),
        ..Default::default()
    };
    let id = cri
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container),
            sandbox_config: Some(config.clone()),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", d.log()))
        .into_inner()
        .container_id;
    cri.start_container(StartContainerRequest { container_id: id.clone() })
        .await
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", d.log()));
    // The pod's sandbox and its container share one shim (grouped by the sandbox id).
    assert_eq!(d.shims().len(), 1, "one shim per pod");

    let exec = cri
        .exec_sync(ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["/bin/sh".into(), "-c".into(), "echo exec-out; echo exec-err >&2; exit 4".into()],
            timeout: 30,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync: {e}\n{}", d.log()))
        .into_inner();
    assert_eq!((exec.exit_code, &exec.stdout[..], &exec.stderr[..]), (4, &b"exec-out\n"[..], &b"exec-err\n"[..]));

    let status = |cri: &mut RuntimeServiceClient<Channel>| {
        let (mut cri, id) = (cri.clone(), id.clone());
        async move {
            cri.container_status(ContainerStatusRequest { container_id: id, verbose: false })
                .await
                .expect("ContainerStatus")
                .into_inner()
                .status
                .expect("a status")
        }
    };
    assert_eq!(status(&mut cri).await.state, ContainerState::ContainerRunning as i32);
    // The container's stdout reached CRI's log (written through the FIFOs the shim wired).
    let log = std::path::Path::new(&config.log_directory).join("app.log");
    wait_until("the container's output is in its CRI log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("app-started trainer"))
    });

    cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", d.log()));
    let st = status(&mut cri).await;
    assert_eq!(st.state, ContainerState::ContainerExited as i32);
    assert_eq!(st.exit_code, 137, "sleep ends by SIGKILL when its pod stops");
    cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.clone() })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}\n{}", d.log()));
    let left = cri.list_pod_sandbox(ListPodSandboxRequest::default()).await.expect("ListPodSandbox").into_inner().items;
    assert!(left.is_empty(), "pods left: {left:?}");
    wait_until("the pod's shim exited", || d.shims().is_empty());
}
